"""`itune models`, `promote`, `report`, `generate` and `chat`: the evaluated models and talking to them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from catalog import layout
from catalog.config import PipelineConfig
from commands.base import (
    ConfigOption,
    ModelOption,
    RootOption,
    SetOption,
    TemplateOption,
    app,
    err,
    fail,
    figure,
    out,
    print_decision,
    settings,
)
from commands.running import print_summary
from toolkit.baselines import BASELINES
from toolkit.registry import Registry, RegistryError


@app.command()
def models(config: ConfigOption = None, set_: SetOption = None, root: RootOption = None) -> None:
    """List the evaluated models (candidates) and the champion, with their metrics."""
    cfg, registry = settings(config, set_, root)
    try:
        data = registry.load()
    except RegistryError as exc:
        fail(str(exc))
    if not data["candidates"]:
        out.print(f"no evaluated models under {registry.root} yet: `itune run` evaluates one", highlight=False)
        return
    champion = (data["champion"] or {}).get("model_key")
    shown = {"tuned_exact_match": "exact match", "tuned_rouge_l": "ROUGE-L", "tuned_val_loss": "val loss"}
    if cfg.promote.primary_metric not in shown:
        shown = {cfg.promote.primary_metric: cfg.promote.primary_metric, **shown}
    table = Table(title=f"models · {registry.file}")
    table.add_column("")
    table.add_column("model", no_wrap=True)
    table.add_column("evaluated")
    for label in shown.values():
        table.add_column(label, justify="right")
    table.add_column("last decision")
    for key, entry in sorted(data["candidates"].items(), key=lambda item: item[1].get("evaluated_at", "")):
        metrics, last = entry.get("metrics", {}), entry.get("last_decision") or {}
        verdict = ("promoted" if last.get("promoted") else "kept out") + f" ({last.get('how', '-')})" if last else "-"
        table.add_row("[bold green]★[/]" if key == champion else "", key,
                      entry.get("evaluated_at", "-")[:16].replace("T", " "),
                      *(figure(metrics, name) for name in shown), verdict)
    out.print(table)
    if champion:
        out.print(f"★ champion: {champion} ({data['champion']['how']}) at {data['champion']['model_uri']}",
                  highlight=False)


@app.command("promote")
def promote_model(
    model: Annotated[str, typer.Argument(help="a registered model key (or its prefix) or its artifact folder")],
    reason: Annotated[str, typer.Option(help="why, kept in the registry history")] = "",
    config: ConfigOption = None, set_: SetOption = None, root: RootOption = None,
) -> None:
    """Make a model the champion whatever its metrics (recorded as a manual promotion)."""
    _, registry = settings(config, set_, root)
    try:
        decision = registry.promote_manual(model, reason)
    except RegistryError as exc:
        fail(str(exc))
    print_decision(decision)


def _find_evaluation(registry: Registry, spec: str | None) -> tuple[Path, dict[str, Any] | None]:
    """Give back (an intact evaluate artifact folder, the registry decision taken on it) for RUN."""
    from catalog.store import ArtifactStore

    history = registry.load()["history"]
    store = ArtifactStore(registry.root)
    by_run = [e for e in history if spec is not None and e.get("flow_run_id") == spec]
    if spec is None and history:
        key = history[-1]["evaluate_key"]
    elif spec is None:  # evaluated before the registry existed: the newest intact evaluation
        built = [(m["created_at"], m["key"]) for folder in (registry.root / "evaluate").glob("[!.]*")
                 if (m := store.manifest("evaluate", folder.name))]
        key = max(built)[1] if built else fail(f"no evaluation under {registry.root} yet: `itune run` makes one")
    elif by_run:
        key = by_run[-1]["evaluate_key"]
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser().resolve()
        store, key = ArtifactStore(folder.parent.parent), folder.name
    else:
        keys = [k.name for k in (registry.root / "evaluate").glob(f"{spec}*")]
        if len(keys) != 1:
            fail(f"'{spec}' is neither a flow run recorded in {registry.file} nor an evaluate artifact key or folder")
        key = keys[0]
    if store.manifest("evaluate", key) is None:
        fail(f"the evaluate artifact {store.path('evaluate', key)} is missing or corrupt; `itune run` rebuilds it")
    decision = by_run[-1] if by_run else next((e for e in reversed(history) if e.get("evaluate_key") == key), None)
    return store.path("evaluate", key), decision


@app.command()
def report(
    run_: Annotated[str | None, typer.Argument(metavar="[RUN]", help="a flow run id, or an evaluate artifact key or "
                                                                    "folder (default: the latest evaluation)")] = None,
    config: ConfigOption = None, set_: SetOption = None, root: RootOption = None,
) -> None:
    """Print an evaluation's summary: metrics, per-category scores, sample generations, promotion."""
    import pandas as pd

    cfg, registry = settings(config, set_, root)
    folder, decision = _find_evaluation(registry, run_)
    metrics = layout.read_metrics(folder)
    print_summary({"flow_run_id": decision.get("flow_run_id") if decision else "-", "steps": {}, "metrics": metrics,
                    "promotion": decision}, 0.0, title=f"evaluation {folder.name} ({metrics['examples']} examples)")
    categories = Table(title="per category, beside what needs no learning")
    baselines = [name for name in BASELINES if any(name in row for row in metrics["per_category"].values())]
    for column in ("category", "scoring", "examples", "base", "tuned", *(n.replace("_", " ") for n in baselines)):
        categories.add_column(column, justify="left" if column in ("category", "scoring") else "right")
    for category, row in metrics["per_category"].items():
        categories.add_row(category or "(none)", row["scoring"], str(row["examples"]), f"{row['base']:.3f}",
                           f"{row['tuned']:.3f}", *(f"{row[n]:.3f}" if n in row else "-" for n in baselines))
    out.print(categories)
    if metrics.get("base_model"):
        out.print(f"base: {metrics['base_model']}", highlight=False)
    samples = Table(title="sample generations", show_lines=True)
    for column in ("instruction", "input", "reference", "base", "tuned"):
        samples.add_column(column, overflow="fold")
    frame = pd.read_parquet(folder / layout.SAMPLES).head(cfg.eval.report_samples)
    for row in frame.itertuples():
        samples.add_row(*(str(v).strip() for v in (row.instruction, row.input, row.response, row.base_output,
                                                    row.tuned_output)))
    out.print(samples)
    out.print(f"report {folder / layout.REPORT}\nloss curve {folder / layout.LOSS_CURVE}", highlight=False)


def _responder(cfg: PipelineConfig, registry: Registry, model: str, template: str | None):
    """Give back (reply(messages) -> text, make a user message(instruction, input), description) for a model,
    prompted with the chat template its folder carries (a folder without one: its lineage's or --template)."""
    from catalog.lineage import model_and_template
    from catalog.store import ArtifactError

    try:
        model_dir, trained_with = model_and_template(registry.model_folder(model))
    except (RegistryError, ArtifactError) as exc:
        fail(str(exc))
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tasks.evaluate import generate_answers
    from toolkit.chat_template import folder_template, generation_prompt, user_turn

    hf_logging.set_verbosity_error()  # the terminal shows the answer, not loader progress bars and hints
    hf_logging.disable_progress_bar()
    jinja, source = folder_template(model_dir), "the model folder's chat template"
    if jinja is None:
        jinja, source = _template_of(trained_with, template)
    elif template:
        err.print(f"note: {model_dir} carries its chat template; --template {template} is not used", highlight=False)
    network = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    budget = network.config.n_positions - cfg.eval.max_new_tokens

    def reply(messages: list[dict[str, str]]) -> str:
        return generate_answers(network, [generation_prompt(messages, jinja)], cfg.eval, budget)[0].strip()

    def user_message(instruction: str, input_text: str = "") -> dict[str, str]:
        return user_turn(jinja, instruction, input_text)

    return reply, user_message, f"{model_dir} ({source})"


def _template_of(trained_with: dict[str, Any] | None, template: str | None) -> tuple[str, str]:
    """Give back (the Jinja chat template, where it came from) for a folder that carries none."""
    from catalog.config import TemplateConfig
    from tasks.template import template_parts
    from toolkit.chat_template import chat_template_for

    try:
        chosen = TemplateConfig(**(trained_with or {"name": template or "paper"}))
    except ValueError as exc:
        fail(f"template: {str(exc).splitlines()[-1].strip()}", 2)
    where = "its lineage" if trained_with else "--template" if template else "the default"
    return chat_template_for(chosen, template_parts(chosen)), f"template '{chosen.name}' from {where}"


@app.command()
def generate(
    instruction: Annotated[str, typer.Argument(help="what the model should do")],
    input_: Annotated[str, typer.Option("--input", "-i", help="the input the instruction works on")] = "",
    system: Annotated[str, typer.Option(help="a system prompt put before the instruction")] = "",
    model: ModelOption = "champion", template: TemplateOption = None,
    config: ConfigOption = None, set_: SetOption = None, root: RootOption = None,
) -> None:
    """Print a model's response to one instruction (generation settings from the eval config)."""
    cfg, registry = settings(config, set_, root)
    reply, user_message, _ = _responder(cfg, registry, model, template)
    print(reply([*_system(system), user_message(instruction, input_)]))


def _system(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": text}] if text else []


@app.command()
def chat(model: ModelOption = "champion", template: TemplateOption = None,
         system: Annotated[str, typer.Option(help="a system prompt that opens the conversation")] = "",
         config: ConfigOption = None, set_: SetOption = None, root: RootOption = None) -> None:
    """Talk to a model, which sees the whole conversation so far: one message per line (`text || input` adds an
    input); an empty line ends."""
    cfg, registry = settings(config, set_, root)
    reply, user_message, description = _responder(cfg, registry, model, template)
    out.print(f"chatting with {description}; an empty line or Ctrl-D ends", highlight=False)
    history = _system(system)
    while True:
        sys.stdout.write("you> ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line.strip() or line.strip() in ("exit", "quit"):
            break
        instruction, _, input_text = line.strip().partition(" || ")
        history.append(user_message(instruction.strip(), input_text.strip()))
        answer = reply(history)
        history.append({"role": "assistant", "content": answer})
        print(f"model> {answer}", flush=True)
