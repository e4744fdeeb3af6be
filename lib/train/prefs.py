"""Stage 04_prefs: preference tuning (phase 3) of the phase-2 model, DPO or ORPO, full or LoRA, on the shared loop.

    final = run_prefs(cfg)    # artifacts/04_prefs/<hash>/: HF model dir, metrics, manifest (before/after)

Each micro-batch holds B pairs as 2B rows (the chosen replies, then the rejected ones) and `PreferenceModel` turns
them into the loss, so lib.train.loop.fit trains phase 3 exactly as phases 1 and 2: precision policy, time budget,
early stopping, checkpoints and resume. Only the reply's tokens count (the conversation before it is context).

DPO (Rafailov et al. 2023), sigmoid form with conservative label smoothing ε, on summed reply log-probs:
    h = β [(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]
    loss = −(1 − ε) log σ(h) − ε log σ(−h)
with π_ref the frozen phase-2 model (under LoRA: the same model with its adapters switched off), plus
`sft_weight` × the chosen replies' NLL per token where set (RPO; TRL's loss_type=["sigmoid", "sft"]).
ORPO (Hong et al. 2024), no reference in the loss, on mean reply log-probs ℓ:
    loss = NLL(c) − λ log σ(log odds(c) − log odds(r)),  log odds(y) = ℓ(y) − log(1 − exp ℓ(y))
The reference model still measures both (rewards β(log π − log π_ref), KL), so runs of either method compare.

The offline default data is self-play (SPIN): prompts and replies of sft.data, each reply chosen over the phase-2
model's own sampled reply to the same prompt. The pairs are written to the work dir, so a resumed run reuses them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lib.artifacts import require_stage, stage_output
from lib.atomic import atomic_file
from lib.chat import encode_chat, end_of_turn_ids, prepare_tokenizer
from lib.config import Config, PrefsConfig, SelfPlayConfig
from lib.data.pref_data import PrefPair, load_pref_pairs
from lib.data.sft_data import load_sft_examples
from lib.data.tokenizer import load_tokenizer
from lib.errors import UserError
from lib.model.hf_io import save_model_dir
from lib.stages import stage_dir
from lib.train.base_model import HFCausalLM, apply_lora, load_base, reply_ids
from lib.train.loop import Run, fit, make_accelerator, reuse_or_train, work_dir
from lib.train.sft import CHECK_PROMPTS, chat_sampler, end_of_turn_check
from lib.train.sft_batches import Encoded, SftBatches, encode_conversations, split_examples
from lib.train.tracking import copy_run_logs

PAIRS = "pairs.jsonl"  # the work dir's record of the pairs (self-play samples are not drawn twice)
MIN_STOP_WORDS = 3  # a loop's own text kept as the chosen reply has this many words at least ("Hi!" taught "Hi!")
HELD_OUT_PROMPTS = 50  # end-of-turn rate before/after on this many held-out prompts
EVAL_PROMPTS = 16  # ... and at every eval on this many (greedy replies cost more than the loss)


# ---------------------------------------------------------------------------------------------------------
# The losses (pure functions of per-sequence log-probs; tests/test_prefs.py compares them with TRL).


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target) over the masked positions, number of masked positions), each (B,)."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    m = mask.to(logp.dtype)
    return (logp * m).sum(-1), m.sum(-1)


def dpo_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0):
    """Per-pair sigmoid DPO loss and the implicit rewards of the chosen and rejected replies (detached)."""
    h = beta * ((pc - rc) - (pr - rr))
    losses = -F.logsigmoid(h) * (1 - label_smoothing) - F.logsigmoid(-h) * label_smoothing
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def orpo_loss(mean_c, mean_r, nll_c, lam: float):
    """Per-pair ORPO loss from the mean reply log-probs and the chosen replies' NLL; and the log odds ratio."""
    log_odds = (mean_c - mean_r) - (torch.log1p(-torch.exp(mean_c)) - torch.log1p(-torch.exp(mean_r)))
    return nll_c - lam * F.logsigmoid(log_odds), log_odds.detach()


class PreferenceModel(torch.nn.Module):
    """The policy under training with the interface lib.train.loop.fit calls: forward(x, targets, loss_mask) on
    2B rows (B chosen, then B rejected) -> (None, mean loss). The reference is held outside the module's state, so
    checkpoints carry the policy alone."""

    def __init__(self, policy: torch.nn.Module, prefs: PrefsConfig, reference: torch.nn.Module | None = None,
                 peft_model=None):
        super().__init__()
        self.policy, self.prefs = policy, prefs
        self._ref = [reference]  # a list: not a submodule (no parameters, no state dict entries)
        self._peft = [peft_model]
        self.last: dict = {}

    def _logits(self, model, x):
        return model(x)[0]

    @torch.no_grad()
    def reference_logits(self, x):
        """The frozen reference's logits: its copy, or under LoRA the policy with its adapters switched off."""
        if self._ref[0] is not None:
            return self._logits(self._ref[0], x)
        with self._peft[0].disable_adapter():
            return self._logits(self.policy, x)

    def reference_logps(self, x, targets, mask):
        return sequence_logps(self.reference_logits(x), targets, mask)[0]

    def forward(self, x, targets=None, loss_mask=None):
        B, p = x.shape[0] // 2, self.prefs
        logits = self._logits(self.policy, x)
        logps, counts = sequence_logps(logits, targets, loss_mask)
        ref = self.reference_logps(x, targets, loss_mask)
        pc, pr, rc, rr = logps[:B], logps[B:], ref[:B], ref[B:]
        chosen_r, rejected_r = (p.beta * (pc - rc)).detach(), (p.beta * (pr - rr)).detach()
        if p.method == "dpo":
            losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, p.beta, p.label_smoothing)
            loss = losses.mean()
            if p.sft_weight:  # RPO: + the chosen replies' NLL per token
                loss = loss - p.sft_weight * pc.sum() / counts[:B].sum().clamp(min=1)
        else:
            n = counts.clamp(min=1)
            mean = logps / n
            loss = orpo_loss(mean[:B], mean[B:], -mean[:B], p.orpo_lambda)[0].mean()
        self.last = {"chosen_rewards": chosen_r, "rejected_rewards": rejected_r, "chosen_logps": pc.detach(),
                     "rejected_logps": pr.detach()}
        return None, loss


# ---------------------------------------------------------------------------------------------------------
# Pairs as rows.


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded


def _reply_only(enc: Encoded, ended: bool, max_len: int) -> Encoded | None:
    """Train on the last assistant turn only; without its end token when the reply never ended (a sample cut at
    its limit); cut to max_len tokens keeping the context whole. None when the context alone fills max_len."""
    ids, mask = enc.ids, enc.mask.copy()
    if len(enc.turn_ends) > 1:
        mask[:enc.turn_ends[-2]] = False
    if not ended and enc.turn_ends:
        ids, mask = ids[:enc.turn_ends[-1] - 1], mask[:enc.turn_ends[-1] - 1]
    first = int(np.argmax(mask)) if mask.any() else len(ids)
    if first >= max_len - 1:
        return None
    return Encoded(ids[:max_len], mask[:max_len])


def encode_pairs(tokenizer, pairs: list[PrefPair], max_len: int, rejected_end_token: bool = True
                 ) -> tuple[list[EncodedPair], dict]:
    """Pairs as rows; rejected_end_token=False leaves the rejected reply's end-of-turn token out (prefs.
    rejected_end_token)."""
    chosen = encode_conversations(tokenizer, [p.prompt + [{"role": "assistant", "content": p.chosen}] for p in pairs])
    rejected = encode_conversations(tokenizer, [p.prompt + [{"role": "assistant", "content": p.rejected}]
                                                for p in pairs])
    out, dropped, cut = [], 0, 0
    for p, c, r in zip(pairs, chosen, rejected):
        ec, er = _reply_only(c, True, max_len), _reply_only(r, p.rejected_ended and rejected_end_token, max_len)
        if ec is None or er is None:
            dropped += 1
            continue
        cut += len(c.ids) > max_len or len(r.ids) > max_len
        out.append(EncodedPair(ec, er))
    return out, {"pairs": len(out), "dropped_too_long": dropped, "truncated": cut,
                 "tokens": sum(len(e.chosen.ids) + len(e.rejected.ids) for e in out)}


class PairBatches(SftBatches):
    """SftBatches over pairs: a micro-batch of B pairs is 2B rows, the chosen replies first."""

    @staticmethod
    def row_len(row: EncodedPair) -> int:
        return len(row.chosen.ids) + len(row.rejected.ids)

    def collate(self, rows: list[EncodedPair]) -> dict[str, torch.Tensor]:
        return super().collate([r.chosen for r in rows] + [r.rejected for r in rows])


# ---------------------------------------------------------------------------------------------------------
# Self-play pairs and the measurements.


def loop_start(ids: list[int], n: int) -> int | None:
    """Where a reply starts repeating itself: the first position at which an n-token run recurs; None when none
    does."""
    seen = set()
    for j in range(len(ids) - n + 1):
        gram = tuple(ids[j:j + n])
        if gram in seen:
            return j
        seen.add(gram)
    return None


def sft_prompts(cfg: Config) -> list[tuple[list[dict], str, str]]:
    """(conversation up to its first reply, that reply, where) for each conversation of sft.data."""
    examples, _ = load_sft_examples(cfg.sft, cfg.base_dir)
    prompts = []
    for ex in examples:
        msgs = ex.messages or []
        k = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), None)
        if k and msgs[k - 1]["role"] == "user":
            prompts.append((msgs[:k], msgs[k]["content"], ex.where))
    if not prompts:
        raise UserError("prefs.data: self_play needs sft.data with conversations (a user turn, then a reply); "
                        "the SFT data has none. Give prefs.data a file of preference pairs instead.")
    return prompts


def held_out_prompts(cfg: Config, val_pairs: list[PrefPair]) -> list[list[dict]]:
    """The prompts the end-of-turn rate is measured on, none of them trained on: with self-play, distinct sft.data
    prompts on the held-out side of the split (drawn whatever the model's reply to them, since self-play keeps
    only failures); otherwise the held-out pairs' prompts."""
    if not any(src.type == "self_play" for src in cfg.prefs.data):
        return [p.prompt for p in val_pairs][:HELD_OUT_PROMPTS]
    distinct = {}
    for prompt, _, _ in sft_prompts(cfg):
        pair = PrefPair(prompt, "", "")
        distinct.setdefault(pair.key(), pair)
    _, val = split_examples(list(distinct.values()), cfg.prefs.val_fraction, cfg.seed)
    order = np.random.default_rng([cfg.seed, 11]).permutation(len(val))
    return [val[i].prompt for i in order[:HELD_OUT_PROMPTS]]


def _whole_sentences(text: str) -> str:
    """text up to its last sentence or line end ("" when it has none): a reply cut there is not cut mid-sentence."""
    end = max(text.rfind(c) for c in ".!?\n")
    kept = text[:end + 1].strip()
    return kept if len(kept.split()) >= MIN_STOP_WORDS else ""


def pairs_from_reply(tokenizer, sp: SelfPlayConfig, prompt: list[dict], data_reply: str, new: list[int],
                     ended: bool, where: str) -> list[PrefPair]:
    """The pairs one sampled reply (token ids `new`, `ended` its turn or not) gives: the data's reply over it (with
    sp.only_failures only when it never ended or repeats itself), and with sp.loop_pairs, for a reply that repeats
    itself, its own whole sentences before the repetition (ended) over the same text running on into the repeat."""
    reply = tokenizer.decode(new, skip_special_tokens=True)
    cut = loop_start(new, sp.loop_ngram)
    out = []
    if reply.strip() != data_reply.strip() and not (sp.only_failures and ended and cut is None):
        out.append(PrefPair(prompt, data_reply, reply, f"self-play of {where}", rejected_ended=ended))
    stopped = _whole_sentences(tokenizer.decode(new[:cut], skip_special_tokens=True)) if cut and sp.loop_pairs else ""
    if stopped:
        looped = tokenizer.decode(new[:cut + sp.loop_ngram], skip_special_tokens=True)
        out.append(PrefPair(prompt, stopped, looped, f"self-play loop of {where}", rejected_ended=False))
    return out


def self_play_pairs(model, tokenizer, cfg: Config, log=print) -> list[PrefPair]:
    """Prompts of sft.data (the conversation up to its first reply) in a seeded order, each answered by the model
    (self_play.temperature; greedy by default) and turned into pairs by pairs_from_reply, until max_pairs pairs or
    max_prompts replies. Seeded: the same model and config give the same pairs."""
    sp = cfg.prefs.self_play
    prompts = sft_prompts(cfg)
    order = np.random.default_rng([cfg.seed, 7]).permutation(len(prompts))[:sp.max_prompts]
    stops = end_of_turn_ids(tokenizer)
    pairs = []
    for n, i in enumerate(order):
        if len(pairs) >= sp.max_pairs:
            break
        prompt, chosen, where = prompts[i]
        new, ended = reply_ids(model, encode_chat(tokenizer, prompt), sp.max_new_tokens, stops, sp.temperature,
                               seed=cfg.seed + int(i))
        pairs += pairs_from_reply(tokenizer, sp, prompt, chosen, new, ended, where)
        if (n + 1) % 250 == 0:
            log(f"self-play: {n + 1} replies sampled, {len(pairs)} pairs")
    return pairs


def _load_pairs(path: Path) -> list[PrefPair]:
    return [PrefPair(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _save_pairs(path: Path, pairs: list[PrefPair]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(vars(p), ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")


@torch.no_grad()
def pair_metrics(pm: PreferenceModel, batches: PairBatches, n_batches: int, device) -> dict:
    """On held-out pairs: reward accuracy and margin, mean chosen/rejected log-probs, and the mean per-token KL of
    the policy from the reference along the chosen replies."""
    was = pm.training
    pm.eval()
    acc, margin, lc, lr_, kl, tokens = [], [], [], [], 0.0, 0.0
    try:
        for batch in batches.eval_batches(n_batches):
            x, y, m = (batch[k].to(device) for k in ("x", "y", "mask"))
            pm(x, y, m)
            s = pm.last
            acc += (s["chosen_rewards"] > s["rejected_rewards"]).float().tolist()
            margin += (s["chosen_rewards"] - s["rejected_rewards"]).tolist()
            lc += s["chosen_logps"].tolist()
            lr_ += s["rejected_logps"].tolist()
            B = x.shape[0] // 2
            logp = torch.log_softmax(pm._logits(pm.policy, x[:B]).float(), -1)
            ref = torch.log_softmax(pm.reference_logits(x[:B]).float(), -1)
            per_pos = (logp.exp() * (logp - ref)).sum(-1)
            kl += float((per_pos * m[:B]).sum())
            tokens += float(m[:B].sum())
    finally:
        pm.train(was)
    if not acc:
        return {}
    return {"reward_accuracy": float(np.mean(acc)), "reward_margin": float(np.mean(margin)),
            "chosen_logps": float(np.mean(lc)), "rejected_logps": float(np.mean(lr_)),
            "kl_to_reference": kl / max(tokens, 1.0)}


def reply_metrics(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 64) -> dict:
    """Greedy replies to held-out conversations: the share that ends its turn, and the mean reply length."""
    stops = end_of_turn_ids(tokenizer)
    ended, lengths = 0, []
    for msgs in prompts:
        new, stopped = reply_ids(model, encode_chat(tokenizer, msgs), max_new_tokens, stops)
        ended += stopped
        lengths.append(len(new))
    return {"end_of_turn_rate": ended / max(len(prompts), 1), "mean_reply_tokens": float(np.mean(lengths or [0])),
            "prompts": len(prompts), "max_new_tokens": max_new_tokens}


# ---------------------------------------------------------------------------------------------------------
# The stage.


def _pairs_for(cfg: Config, model, tokenizer, work: Path, log) -> tuple[list[PrefPair], list[dict]]:
    """The run's pairs: those written by an interrupted run of the same stage hash, else read and sampled now."""
    if (work / PAIRS).is_file():
        info = json.loads((work / (PAIRS + ".info.json")).read_text(encoding="utf-8"))
        log(f"prefs: reusing {work / PAIRS} ({info['total']} pairs)")
        return _load_pairs(work / PAIRS), info["sources"]
    pairs, sources = load_pref_pairs(cfg.prefs, cfg.base_dir, cfg.sft.system_prompt)
    for i, src in enumerate(cfg.prefs.data):
        if src.type == "self_play":
            played = self_play_pairs(model, tokenizer, cfg, log)
            pairs += played
            sources.append({"index": i, "type": "self_play", "format": "self_play", "pairs": len(played),
                            "temperature": cfg.prefs.self_play.temperature,
                            "rejected_unended": sum(not p.rejected_ended for p in played),
                            "loop_pairs": sum(p.where.startswith("self-play loop") for p in played)})
    work.mkdir(parents=True, exist_ok=True)
    _save_pairs(work / PAIRS, pairs)
    with atomic_file(work / (PAIRS + ".info.json")) as tmp:
        tmp.write_text(json.dumps({"total": len(pairs), "sources": sources}), encoding="utf-8")
    return pairs, sources


def train_prefs(cfg: Config) -> Path:
    prefs, t = cfg.prefs, cfg.prefs.train
    if not prefs.enabled:
        raise UserError("prefs.enabled is false: phase 3 is switched off in this config (the export takes the "
                        "phase-2 model); set prefs.enabled: true to run it")
    sft_dir = require_stage(cfg, "04_sft", "Run: python 04_sft.py (or snakemake sft_model).")
    if not (sft_dir / "model.safetensors").is_file() and not (sft_dir / "model.safetensors.index.json").is_file():
        raise UserError(f"{sft_dir}: phase 2 saved a LoRA adapter alone (sft.lora.merge: false); phase 3 tunes a "
                        "whole model: set sft.lora.merge: true, or prefs.enabled: false")
    tokenizer = prepare_tokenizer(load_tokenizer(sft_dir), str(sft_dir))
    accelerator, note = make_accelerator(t.precision, cfg.coursework.enabled and cfg.coursework.cpu_only)
    log = accelerator.print
    torch.manual_seed(cfg.seed)
    model, kind = load_base(sft_dir)
    work = work_dir(cfg, "04_prefs")
    pairs, sources = _pairs_for(cfg, model, tokenizer, work, log)
    train_pairs, val_pairs = split_examples(pairs, prefs.val_fraction, cfg.seed)
    max_len = t.seq_len + 1
    train_enc, train_stats = encode_pairs(tokenizer, train_pairs, max_len, prefs.rejected_end_token)
    val_enc, val_stats = encode_pairs(tokenizer, val_pairs, max_len, prefs.rejected_end_token)
    per_source = ", ".join(f"{s['type']}: {s['pairs']:,}" for s in sources)
    log(f"prefs: {len(pairs):,} pairs ({per_source}); "
        f"train {train_stats['pairs']:,}, held out {val_stats['pairs']:,}; "
        f"{train_stats['dropped_too_long'] + val_stats['dropped_too_long']:,} dropped as longer than "
        f"prefs.train.seq_len={t.seq_len}")
    if not train_enc:
        raise UserError(f"prefs.data: no training pair fits in prefs.train.seq_len={t.seq_len} tokens; raise it")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = PairBatches(train_enc, t.batch_size, t.grad_accum, cfg.seed, pad)
    val = PairBatches(val_enc, t.batch_size, 1, cfg.seed, pad) if val_enc else None

    held_out = held_out_prompts(cfg, val_pairs)
    before = {"replies": end_of_turn_check(model, tokenizer, CHECK_PROMPTS, cfg.sft.system_prompt),
              "held_out": reply_metrics(model, tokenizer, held_out)}
    n_params = model.num_params()
    peft_model, lora_info = apply_lora(model, prefs.lora, n_params) if prefs.lora.enabled else (None, None)
    reference = None if peft_model is not None else copy.deepcopy(model).eval().requires_grad_(False)
    pm = PreferenceModel(model, prefs, reference, peft_model)
    if val is not None:
        before["pairs"] = pair_metrics(pm, val, t.eval_batches, accelerator.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"prefs: {prefs.method.upper()} on {sft_dir} ({n_params / 1e6:.2f}M parameters), "
        f"{'LoRA' if peft_model is not None else 'full'}: {trainable:,} trainable; beta {prefs.beta}")

    def eval_metrics(wrapper) -> dict:
        out = pair_metrics(wrapper, val, t.eval_batches, accelerator.device) if val is not None else {}
        return {**out, **{k: v for k, v in reply_metrics(wrapper.policy, tokenizer, held_out[:EVAL_PROMPTS]).items()
                          if k in ("end_of_turn_rate", "mean_reply_tokens")}}

    result = fit(pm, train, val, Run(
        t, work, accelerator, seed=cfg.seed, precision_note=note,
        world_batch_tokens=t.batch_size * t.grad_accum * accelerator.num_processes * train.mean_len,
        flops_per_token=model.estimate_flops_per_token(t.seq_len) * (4 / 3 if reference is not None else 1),
        sample_fn=_policy_sampler(tokenizer, t, cfg), config_name="prefs.train", run_name=cfg.name,
        eval_metrics=eval_metrics if val is not None else None))
    final = stage_dir(cfg, "04_prefs")
    if not accelerator.is_main_process:
        return final
    pm = accelerator.unwrap_model(pm)
    pm.load_state_dict(load_file(str(result.weights_path)))
    after = {"pairs": pair_metrics(pm, val, t.eval_batches, accelerator.device) if val is not None else {}}
    policy = peft_model.merge_and_unload() if peft_model is not None else pm.policy
    if isinstance(model, HFCausalLM) and peft_model is not None:
        model.hf, policy = policy, model
    policy = policy.float()
    after["replies"] = end_of_turn_check(policy, tokenizer, CHECK_PROMPTS, cfg.sft.system_prompt)
    after["held_out"] = reply_metrics(policy, tokenizer, held_out)
    with stage_output(cfg, "04_prefs") as (out, extra):
        save_model_dir(policy, out, tokenizer)
        copy_run_logs(work, out)
        extra.update({
            "base_model": str(sft_dir.resolve()), "base_kind": kind, "method": prefs.method, "beta": prefs.beta,
            "label_smoothing": prefs.label_smoothing, "orpo_lambda": prefs.orpo_lambda,
            "mode": "lora" if peft_model is not None else "full", "lora": lora_info, "parameters": n_params,
            "trainable_parameters": trainable, "data": {"sources": sources, "train": train_stats, "val": val_stats},
            "steps": result.steps, "tokens": result.tokens, "stop_reason": result.stop_reason,
            "precision": result.precision, "train_seconds": result.elapsed_s, "best_val_loss": result.best_val_loss,
            "final_eval": result.last_val, "history": result.history, "before": before, "after": after,
            "end_of_turn": after["replies"],
        })
    b, a = before["held_out"], after["held_out"]
    log(f"preference-tuned model: {final}  (held-out reward accuracy "
        f"{after['pairs'].get('reward_accuracy', float('nan')):.2f}; end of turn {b['end_of_turn_rate']:.0%} -> "
        f"{a['end_of_turn_rate']:.0%} on {a['prompts']} held-out prompts; {result.stop_reason})")
    return final


def _policy_sampler(tokenizer, t, cfg: Config):
    sample = chat_sampler(tokenizer, t.sample_prompts or CHECK_PROMPTS[:1], t.sample_tokens, cfg.seed,
                          cfg.sft.system_prompt)
    return lambda wrapper: sample(wrapper.policy)


def run_prefs(cfg: Config, force: bool = False) -> Path:
    """Stage 04_prefs: reuse a complete output, or train (resuming from a checkpoint; from scratch with force)."""
    return reuse_or_train(cfg, "04_prefs", train_prefs, force)

