"""The model card (``README.md``) that ``fedit export`` writes beside an exported model.

Hugging Face's layout: YAML front matter (``base_model``: the base's Hub repo id, left out
for a local base; ``library_name``, ``license``, ``tags``, ``datasets``), then sections on
the base model, the data, the federation, the evaluation, how to load it and the data's
licence. Everything is read from the run folder (``config.toml``, ``metrics.jsonl``,
``summary.json``, ``eval.json``); an adapter outside any run gets a shorter card that says
what is not known.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedit.algorithms.strategies import num_sampled
from fedit.config import RunConfig
from fedit.data.load import DOLLY
from fedit.data.prompts import ALPACA_PROMPT_NO_INPUT
from fedit.model.convert import ALIAS_REPOS, ALIASES, hub_repo_id

TAGS = ("fedit", "federated-learning", "lora")
DOLLY_HUB_ID = "databricks/databricks-dolly-15k"
DOLLY_LICENSE = "cc-by-sa-3.0"


@dataclass
class CardFacts:
    """What a model card says, gathered before anything is written.

    Parameters
    ----------
    kind : str
        ``"merged"`` (a transformers folder) or ``"adapter"`` (a PEFT folder).
    base_model : str
        The base model's name as fedit loads it: alias, local folder or hub id.
    folder : str
        The exported folder's name, for the loading snippet.
    lora : dict
        The adapter's ``adapter_config.json``.
    cfg : RunConfig or None
        The run's config; None for an adapter outside any run folder.
    source : str
        What was exported: ``run <name>, final/adapter``, or the adapter folder's name.
    metrics : list of dict
        The run's ``metrics.jsonl`` lines (empty outside a run).
    evals : list of (str, dict)
        ``eval.json`` files of this adapter: where each was found and its content.
    summary : dict
        The run's ``summary.json`` (empty when absent).
    dtype : str or None
        ``--merged``: the dtype the weights were saved in.
    """

    kind: str
    base_model: str
    folder: str
    lora: dict[str, Any]
    cfg: RunConfig | None = None
    source: str = ""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None


def is_dolly(path: str) -> bool:
    """Whether a data path is databricks-dolly-15k (the packaged alias or a copy of it)."""
    return path == DOLLY or Path(path).name.startswith("databricks-dolly-15k")


def model_card(facts: CardFacts) -> str:
    """The whole README.md: front matter, then one section after another."""
    sections = [_front_matter(facts), _title(facts), _base_section(facts),
                _data_section(facts), _federation_section(facts), _eval_section(facts),
                _usage_section(facts), _licence_section(facts)]
    return "\n".join(sections).rstrip() + "\n"


def _q(value: Any) -> str:
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a YAML scalar


def _front_matter(facts: CardFacts) -> str:
    data = facts.cfg.data.path if facts.cfg is not None else None
    repo = hub_repo_id(facts.base_model)  # the Hub's convention: a repo id, never a path
    lines = ["---", *([f"base_model: {_q(repo)}"] if repo else []),
             f"library_name: {'peft' if facts.kind == 'adapter' else 'transformers'}",
             f"license: {DOLLY_LICENSE if data and is_dolly(data) else 'other'}",
             "tags:", *(f"- {t}" for t in TAGS)]
    if data:  # the hub id of dolly, else the local file's name
        lines += ["datasets:", f"- {_q(DOLLY_HUB_ID if is_dolly(data) else Path(data).name)}"]
    return "\n".join([*lines, "---", ""])


def _title(facts: CardFacts) -> str:
    what = "LoRA adapter" if facts.kind == "adapter" else "model (base + LoRA adapter merged)"
    how = "federated instruction tuning" if facts.cfg is not None else "LoRA"
    text = f"# {facts.folder}\n\nA {what} of `{facts.base_model}`, trained with {how} by fedit"
    text += f" ({facts.source}).\n" if facts.source else ".\n"
    if facts.kind == "merged":
        text += (f"\nThe adapter was merged into the base weights in fp32 (W + alpha/r * B A, "
                 f"what PEFT computes) and the result saved in {facts.dtype}; no PEFT is "
                 "needed to load it.\n")
    return text


def _base_kind(name: str) -> str:
    if name in ALIASES:
        package, gguf = ALIASES[name].split(":")
        return (f"a fedit alias of `{ALIAS_REPOS[name]}`: the GGUF file `{gguf}` of the pip "
                f"package `{package.replace('_', '-')}`, dequantized to an fp32 transformers "
                "folder by fedit (`fedit.model.convert.resolve_model`); the adapter was trained "
                "on those weights")
    if hub_repo_id(name) is None:
        return ("a local folder on the machine that trained it, with no known Hub repo id "
                "(so the front matter names no `base_model`)")
    return f"a Hugging Face hub model, https://huggingface.co/{name}"


def _base_section(facts: CardFacts) -> str:
    text = f"## Base model\n\n`{facts.base_model}`: {_base_kind(facts.base_model)}.\n"
    if facts.cfg is not None and facts.cfg.model.quantization:
        text += (f"\nTrained on a {facts.cfg.model.quantization}-bit quantized base (QLoRA); "
                 "the base loaded here is the unquantized one.\n")
    return text


def _data_section(facts: CardFacts) -> str:
    if facts.cfg is None:
        return "## Data\n\nNot recorded: this adapter is not inside a fedit run folder.\n"
    d, p = facts.cfg.data, facts.cfg.partition
    source = ("databricks-dolly-15k (packaged with fedit)" if d.path == DOLLY
              else f"`{Path(d.path).name}`")
    source = f"the files of `{Path(d.clients_dir).name}`" if d.clients_dir else source
    fields = ", ".join(f"{k} <- {v}" for k, v in d.fields.items()) or \
        "instruction, context, response (as named in the file)"
    split = {"dirichlet": f"Dirichlet(alpha = {p.alpha}) over `{p.by or d.label_field}`, "
                          f">= {p.min_size} rows a client",
             "shards": f"{p.shards_per_client} shards a client, sorted by "
                       f"`{p.by or d.label_field}`",
             "natural": f"one client per value of `{p.by or d.label_field}`"}.get(p.method, "")
    lines = [f"- file: {source}" + (f", a seeded subset of {d.max_rows} rows" if d.max_rows
                                    else ""),
             f"- fields: {fields}; label `{d.label_field}`",
             f"- held out: {d.test_per_label} rows per label (the evaluation below)",
             f"- prompt: {d.template} template, cutoff {d.cutoff_len} tokens, loss on "
             + ("prompt and response" if d.train_on_inputs else "the response only"),
             f"- partition: {p.clients} clients, {p.method}" + (f", {split}" if split else "")]
    if d.clients_dir:  # one client a file (README "Client folders"): no partition method
        lines[-1] = (f"- partition: {p.clients} clients, one a file of the folder "
                     f"`{Path(d.clients_dir).name}`")
        if d.test_per_client:
            lines[-1] += f"; {d.test_per_client} rows of each held out for it alone"
    return "## Data\n\n" + "\n".join(lines) + "\n"


def _lora_line(lora: dict[str, Any]) -> str:
    targets = ", ".join(sorted(lora.get("target_modules") or [])) or "?"
    return (f"- LoRA: r = {lora.get('r')}, alpha = {lora.get('lora_alpha')}, dropout "
            f"{lora.get('lora_dropout')}, on {targets}")


def _federation_section(facts: CardFacts) -> str:
    if facts.cfg is None:
        return ("## Training\n\n" + _lora_line(facts.lora) + "\n- strategy, rounds, clients "
                "and training settings: not recorded (no run folder)\n")
    c = facts.cfg
    s, t = c.strategy, c.train
    per_round = num_sampled(c.partition.clients, s.fraction, s.min_clients)
    steps = f"at most {t.max_steps} steps" if t.max_steps else "no step cap"
    lines = [f"- strategy: {s.name}" + (f", aggregator {s.aggregator}" if s.aggregator != "mean"
                                        else ""),
             f"- rounds: {c.rounds}, clients per round: {per_round} of {c.partition.clients} "
             f"(fraction {s.fraction})",
             _lora_line(facts.lora),
             f"- local training: {t.local_epochs} epoch(s) a round, {steps}, batch "
             f"{t.batch_size}, lr {t.lr} ({t.lr_scheduler}"
             + (f"; {t.round_schedule} over rounds to {t.min_lr}"
                if t.round_schedule != "constant" else "") + f"), seed {c.seed}"]
    if c.privacy.mode != "off":
        eps = facts.summary.get("epsilon")
        spent = f", (epsilon, delta) = ({eps:.3g}, {c.privacy.delta:g})" if eps else ""
        lines.append(f"- differential privacy: {c.privacy.mode}, clip {c.privacy.clip}, "
                     f"noise multiplier {c.privacy.noise_multiplier}{spent}")
    if c.compress.method != "none":
        lines.append(f"- uploads compressed: {c.compress.method}")
    return "## Federation\n\n" + "\n".join(lines) + "\n"


def _f(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def _eval_section(facts: CardFacts) -> str:
    parts = []
    held = [m for m in facts.metrics if m.get("eval_loss") is not None]
    if held:
        rows = "".join(f"| {m['round']} | {_f(m['eval_loss'])} |\n" for m in held)
        parts.append("Held-out response loss per round (`metrics.jsonl`; round 0 is the base "
                     f"model): base {_f(held[0]['eval_loss'])}, this adapter "
                     f"{_f(held[-1]['eval_loss'])} (after round {held[-1]['round']}).\n\n"
                     f"| round | held-out loss |\n|---|---|\n{rows.rstrip()}")
    for where, ev in facts.evals:
        o, st = ev.get("overall", {}), ev.get("settings", {})
        rows = f"{o.get('rows')} rows" + (f" of `{Path(st['test_file']).name}`"
                                          if st.get("test_file") else "")
        parts.append(f"`fedit eval` ({where}, {rows}): loss {_f(o.get('loss'))}, perplexity "
                     f"{_f(o.get('perplexity'))}, ROUGE-L {_f(o.get('rouge_l'))}, similarity "
                     f"{_f(o.get('similarity'))}.")
    if not parts:
        parts.append("No evaluation recorded (no held-out loss in metrics.jsonl, no eval.json).")
    return "## Evaluation\n\n" + "\n\n".join(parts) + "\n"


def _prompt_example(facts: CardFacts) -> str:
    if facts.cfg is None:
        return "# the prompt format it was trained with is not recorded\nprompt = '...'"
    if facts.cfg.data.template == "chat":
        return ('messages = [{"role": "user", "content": "Name three rivers."}]\n'
                "prompt = tokenizer.apply_chat_template(messages, tokenize=False, "
                "add_generation_prompt=True)")
    text = ALPACA_PROMPT_NO_INPUT.format(instruction="Name three rivers.")
    return f"prompt = {json.dumps(text)}  # the alpaca template it was trained with"


def _base_load(name: str) -> str:
    if name in ALIASES:
        return ("from fedit.model.convert import resolve_model  # the alias's converted folder\n\n"
                f"base = AutoModelForCausalLM.from_pretrained(resolve_model({json.dumps(name)}))")
    return f"\nbase = AutoModelForCausalLM.from_pretrained({json.dumps(name)})"


def _usage_section(facts: CardFacts) -> str:
    folder = json.dumps(facts.folder)
    if facts.kind == "adapter":
        load = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, "
                f"AutoTokenizer\n{_base_load(facts.base_model)}\n"
                f"model = PeftModel.from_pretrained(base, {folder})\n"
                f"tokenizer = AutoTokenizer.from_pretrained(base.name_or_path)")
        cli = f"`fedit eval {facts.folder} --on FILE` evaluates it."
    else:
        load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({folder})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({folder})")
        cli = f"`fedit eval base:{facts.folder} --on FILE --out DIR` evaluates it."
    gen = (f"{_prompt_example(facts)}\ninputs = tokenizer(prompt, return_tensors=\"pt\")\n"
           "out = model.generate(**inputs, max_new_tokens=128)\n"
           "print(tokenizer.decode(out[0, inputs[\"input_ids\"].shape[1]:], "
           "skip_special_tokens=True))")
    return f"## How to load it\n\n```python\n{load}\n\n{gen}\n```\n\n{cli}\n"


def _licence_section(facts: CardFacts) -> str:
    text = "## Licence of the data\n\n"
    if facts.cfg is None:
        return text + ("Unknown: the training data is not recorded. Check the licence of the "
                       "data it was trained on before you share it.\n")
    if is_dolly(facts.cfg.data.path):
        return text + ("Trained on databricks-dolly-15k by Databricks, Inc., licensed under "
                       "CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/; "
                       "https://huggingface.co/datasets/databricks/databricks-dolly-15k). "
                       "The base model's own licence applies as well.\n")
    return text + (f"fedit does not know the licence of `{Path(facts.cfg.data.path).name}`: "
                   "check it (and the base model's) before you share this model; the "
                   "front matter says `license: other` until you do.\n")
