"""The page of a server whose model is not a chat model: one tab per handler kind (lib.handlers), calling
the same TaskModel as the API, and the one-shot command line (07_serve --prompt / --documents / --audio).

    embedding   Similarity: cosine similarity of texts (one per line) · Search: passages ranked for a query
    classifier  Classify: labels with scores
    reranker    Rerank: documents ranked for a query
    speech      Transcribe: an uploaded or recorded clip

The handlers are plain functions so the tests call them without a browser; `build_task_ui` wires them.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TextIO

import numpy as np

from lib.errors import UserError
from lib.serving.task_models import InputTooLong, TaskModel


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def similarity_table(model: TaskModel, text: str) -> tuple[list[str], list[list]]:
    """(headers, rows): the cosine similarity of every pair of the texts (one per line)."""
    texts = _lines(text)
    if len(texts) < 2:
        raise UserError("write at least two texts, one per line")
    v, _ = model.embed(texts, truncate=True)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    sims = v @ v.T
    short = [t if len(t) <= 40 else t[:39] + "…" for t in texts]
    return ["", *short], [[short[i], *(round(float(x), 4) for x in sims[i])] for i in range(len(texts))]


def search(model: TaskModel, query: str, passages: str) -> list[list]:
    """[[rank, score, passage]] for the passages (one per line), most similar to the query first."""
    docs = _lines(passages)
    if not (query or "").strip() or not docs:
        raise UserError("write a query and at least one passage (one per line)")
    if model.kind == "reranker":
        scores, _ = model.rerank(query.strip(), docs)
    else:
        v, _ = model.embed([query.strip(), *docs], truncate=True)
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        scores = (v[1:] @ v[0]).tolist()
    order = sorted(range(len(docs)), key=lambda i: -scores[i])
    return [[r + 1, round(float(scores[i]), 4), docs[i]] for r, i in enumerate(order)]


def classify_labels(model: TaskModel, text: str) -> dict[str, float]:
    if not (text or "").strip():
        raise UserError("write a text to classify")
    (labels,), _ = model.classify([text.strip()])
    return {x["label"]: x["score"] for x in labels}


def transcribe_clip(model: TaskModel, path: str | None, language: str = "") -> str:
    if not path:
        raise UserError("upload or record a clip first")
    return model.transcribe(path, language.strip() or None)["text"]


def build_task_ui(model: TaskModel):
    import gradio as gr

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    def guarded(fn):
        def run(*args):
            try:
                return fn(*args)
            except (UserError, InputTooLong) as e:
                raise gr.Error(str(e)) from None
        return run

    with gr.Blocks(title="Models at Home", analytics_enabled=False) as demo:
        gr.Markdown(f"## Models at Home · `{model.id}` ({model.kind}, {model.engine})")
        with gr.Tabs():
            if model.kind == "embedding":
                with gr.Tab("Similarity", elem_id="tab-similarity"):
                    texts = gr.Textbox(label="Texts, one per line", lines=6, elem_id="sim-texts")
                    go = gr.Button("Compare", variant="primary", elem_id="sim-go")
                    table = gr.Dataframe(label="Cosine similarity", elem_id="sim-table", interactive=False)

                    def compare(text):
                        headers, rows = similarity_table(model, text)
                        return gr.Dataframe(value=rows, headers=headers)
                    go.click(guarded(compare), texts, table)
            if model.kind in ("embedding", "reranker"):
                title = "Search" if model.kind == "embedding" else "Rerank"
                with gr.Tab(title, elem_id="tab-search"):
                    query = gr.Textbox(label="Query", elem_id="search-query")
                    passages = gr.Textbox(label="Passages, one per line", lines=8, elem_id="search-passages")
                    go = gr.Button(title, variant="primary", elem_id="search-go")
                    ranked = gr.Dataframe(headers=["rank", "score", "passage"], elem_id="search-results",
                                          interactive=False)
                    go.click(guarded(lambda q, p: search(model, q, p)), [query, passages], ranked)
            if model.kind == "classifier":
                with gr.Tab("Classify", elem_id="tab-classify"):
                    text = gr.Textbox(label="Text", lines=4, elem_id="classify-text")
                    go = gr.Button("Classify", variant="primary", elem_id="classify-go")
                    out = gr.Label(label="Labels", elem_id="classify-labels")
                    go.click(guarded(lambda t: classify_labels(model, t)), text, out)
            if model.kind == "speech":
                with gr.Tab("Transcribe", elem_id="tab-transcribe"):
                    audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio",
                                     elem_id="transcribe-audio")
                    lang = gr.Textbox(label="Language (empty: detect)", elem_id="transcribe-language")
                    go = gr.Button("Transcribe", variant="primary", elem_id="transcribe-go")
                    out = gr.Textbox(label="Transcript", lines=6, elem_id="transcribe-text")
                    go.click(guarded(lambda a, la: transcribe_clip(model, a, la)), [audio, lang], out)
            with gr.Tab("Model", elem_id="tab-model"):
                gr.JSON(value=model.describe())
    demo.queue(default_concurrency_limit=2)
    return demo


def one_shot(model: TaskModel, prompt: str | None, documents: list[str] | None, audio: str | None,
             out: TextIO = sys.stdout) -> int:
    """07_serve's --prompt / --documents / --audio for a model of this kind: the answer on `out` as JSON."""
    kind = model.kind
    if kind == "speech":
        if not audio:
            raise UserError(f"{model.id} is a speech-to-text model: pass --audio FILE to transcribe a clip")
        print(model.transcribe(audio)["text"], file=out)
        return 0
    if audio:
        raise UserError(f"--audio: {model.id} is a {kind} model, not a speech model")
    if not prompt:
        raise UserError(f"{model.id} is a {kind} model: pass --prompt TEXT"
                        + (" --documents DOC [DOC ...]" if kind == "reranker" else ""))
    if kind == "reranker":
        if not documents:
            raise UserError(f"{model.id} is a reranker: pass --prompt QUERY --documents DOC [DOC ...]")
        scores, _ = model.rerank(prompt, documents)
        answer = [{"index": i, "relevance_score": round(scores[i], 6), "document": documents[i]}
                  for i in sorted(range(len(scores)), key=lambda i: -scores[i])]
    elif kind == "classifier":
        (labels,), _ = model.classify([prompt])
        answer = labels
    else:
        (vector,), n = model.embed([prompt], truncate=True)
        answer = {"dimensions": len(vector), "tokens": n, "embedding": [round(float(x), 6) for x in vector]}
    print(json.dumps(answer, ensure_ascii=False), file=out)
    return 0
