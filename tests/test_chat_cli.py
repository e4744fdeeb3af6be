"""The terminal chat: the REPL's commands and history (in-process, recording what reaches the engine), and
`07_serve.py --cli` / `--prompt` as subprocesses, on our tiny model and on SmolLM2-135M-Instruct."""

import io
import subprocess
import sys

import pytest
from conftest import ROOT

from lib.config import Config, ServeConfig
from lib.serving.chat_cli import _params, one_shot, repl
from lib.serving.engine import Engine
from lib.serving.loading import load_model
from lib.serving.resolve import resolve_model
from lib.serving.text import fit_conversation


class RecordingEngine(Engine):
    """The real engine, keeping the prompts it was given so the test can read what the model saw."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts: list[str] = []

    def submit(self, prompt_ids, params, *args, **kwargs):
        self.prompts.append(self.loaded.tokenizer.decode(prompt_ids))
        return super().submit(prompt_ids, params, *args, **kwargs)


@pytest.fixture(scope="module")
def loaded(tiny_chat_model_talkative):
    return load_model(resolve_model(str(tiny_chat_model_talkative), Config()), "cpu")


@pytest.fixture
def engine(loaded):
    engine = RecordingEngine(loaded)
    yield engine
    engine.close()


def expected_reply(engine, messages, serve: ServeConfig, seed: int) -> str:
    loaded = engine.loaded
    params = _params(serve, seed)
    ids, _ = fit_conversation(loaded.tokenizer, messages, loaded.context_length, min(params.max_new_tokens, 512))
    return engine.generate_text(ids, params)[0]


def run_serve(*args, stdin: str = "", timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "07_serve.py", "--quiet-config", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_repl_keeps_history_and_obeys_commands(engine):
    serve = ServeConfig(max_new_tokens=8)
    script = "Hello\nHow are you?\n/system Be brief.\nAnd now?\n/reset\nFresh start\n/help\n/bogus\n\n/quit\nnever sent\n"
    out = io.StringIO()
    assert repl(engine, serve, seed=1, inp=io.StringIO(script), out=out, err=io.StringIO()) == 0
    text = out.getvalue()
    first, second, third, fourth = engine.prompts  # four messages reached the model, nothing after /quit
    assert "Hello" in first and "<|im_start|>system" not in first
    first_reply = text.split("bot> ")[1].split("\n")[0]
    assert first_reply and f"Hello<|im_end|>\n<|im_start|>assistant\n{first_reply}<|im_end|>" in second
    assert third.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "How are you?" in third
    assert fourth.startswith("<|im_start|>system\nBe brief.") and "Hello" not in fourth and "Fresh start" in fourth
    assert "[system prompt set]" in text and "[conversation cleared]" in text
    assert "/reset" in text.split("commands:")[1] and "[unknown command /bogus" in text
    assert text.count("bot> ") == 4 and "never sent" not in "".join(engine.prompts)


def test_one_shot_prints_only_the_reply(engine):
    serve = ServeConfig(max_new_tokens=10)
    out = io.StringIO()
    assert one_shot(engine, "Hi", serve, system="Be brief.", seed=2, out=out, err=io.StringIO()) == 0
    reply = out.getvalue()
    assert reply.endswith("\n") and reply[:-1] == expected_reply(
        engine, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], serve, 2)
    err = io.StringIO()
    assert one_shot(engine, "word " * 3000, serve, out=io.StringIO(), err=err) == 2
    assert "context length" in err.getvalue()


@pytest.mark.slow
def test_serve_script_cli_and_prompt_modes(tiny_chat_model_talkative, engine):
    model = str(tiny_chat_model_talkative)
    serve = Config().serve  # what config/default.yaml leaves the serve section at
    r = run_serve("--model", model, "--prompt", "Hello there", "--seed", "7")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_reply(engine, [{"role": "user", "content": "Hello there"}], serve, 7) + "\n"
    assert "Traceback" not in r.stderr

    r = run_serve("--model", model, "--cli", "--seed", "7", "--set", "serve.max_new_tokens=6",
                  stdin="Hello there\n/reset\nAgain\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("chatting with ") and r.stdout.count("bot> ") == 2
    first = r.stdout.split("bot> ")[1].split("\n")[0]
    assert first == expected_reply(engine, [{"role": "user", "content": "Hello there"}],
                                   ServeConfig(max_new_tokens=6), 7)
    assert "[conversation cleared]" in r.stdout

    r = run_serve("--model", str(tiny_chat_model_talkative) + "-missing", "--prompt", "Hi")
    assert r.returncode == 2 and r.stderr.startswith("error: --model") and "Traceback" not in r.stderr


@pytest.mark.slow
def test_smollm2_answers_in_one_shot_mode(smollm2_hf):
    r = run_serve("--model", str(smollm2_hf), "--prompt", "What is the capital of France?",
                  "--set", "serve.temperature=0", "--set", "serve.max_new_tokens=20", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
