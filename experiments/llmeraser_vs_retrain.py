"""How close does LLMEraser come to retraining, and at what cost? Every solver, three request kinds.

On the embedded default: fine-tunes LoRA adapters once (the demo's recipe), then for each
request (removals of 1%, 5% and 10% of the trained people; query edits and response edits of
5% of the people's question-answer / fact examples) retrains the adapter on the data after the
request (the reference) and applies LLMEraser with each solver. Reports, per request and solver:
the forget-gap closed (removals) or the fraction of the retrain's gain in likelihood of the new
responses (edits), retain perplexity against the retrain's, the change of the membership
inference AUC, the distance and KL to the retrain, and the wall-clock of the request (after
compilation) and of its one-off preparation against the retrain's.

Every update goes through `apply_request`, the protocol users run: the fine-tuned adapter is
saved and registered in a fresh lineage (in a temporary folder), and each request is applied to
it as its own branch (`branch=True`), so every request starts from the original adapter and
every solver's preparation (one folder each, made before the requests) serves all of them. An
update the protocol refuses (it makes the objective after the request worse on a held sample,
changes nothing, or its solve failed) is reported as refused, with the reason.

    python experiments/llmeraser_vs_retrain.py                  # about 20 min on 2 CPU cores
    python experiments/llmeraser_vs_retrain.py --fractions 0.05 --solvers cg lowrank

Writes experiments/results/llmeraser_vs_retrain.{json,md}.
"""

import argparse
import dataclasses
import json
import pathlib
import tempfile

import jax
import numpy as np
from flax import nnx

from jaxunlearn import curvature, kernels
from jaxunlearn.adapter import attach_lora
from jaxunlearn.data import tokenize_examples
from jaxunlearn.defaults import ensure_defaults
from jaxunlearn.demo import DemoSettings
from jaxunlearn.eval import (
    distance_to_retrain,
    markdown_table,
    membership_inference,
    next_token_kl,
    perplexity,
    score_examples,
)
from jaxunlearn.train import finetune
from jaxunlearn.unlearn import (
    DEFAULT_LEDGER_NAME,
    Ledger,
    LLMEraser,
    LowRankConfig,
    NoEffectError,
    ObjectiveWorsenedError,
    QueryEdit,
    Removal,
    ResponseEdit,
    Sources,
    apply_request,
    open_adapter,
    open_context,
    resolve_request,
    retrain,
    save_root_adapter,
)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# Each solver's settings; the preparation (curvature sample, damping, eigenbasis) is shared by
# every request of a solver. All start from the demo's: a Newton step on the objective after the
# request (with the fine-tune's L2 penalty), the curvature without the request's examples. The
# low-rank route cannot leave them out (its eigenbasis is prepared first) and its complement
# term (b − UUᵀb)/(μ + λ) diverges on the Newton gradient, so it keeps the paper's influence
# update with the damping rule.
DEMO = DemoSettings()
_NEWTON = DEMO.eraser_settings()
SOLVER_SETTINGS = {
    "cg": _NEWTON,
    "lissa": dataclasses.replace(_NEWTON, solver="lissa", max_steps=60),
    "sgd": dataclasses.replace(_NEWTON, solver="sgd", max_steps=60),
    "lowrank": dataclasses.replace(
        _NEWTON,
        solver="lowrank",
        mode="influence",
        curvature=dataclasses.replace(_NEWTON.curvature, damping=None, leave_out_request=False),
        lowrank=LowRankConfig(rank=48),
    ),
}
# The solvers whose damping λ follows the rule relative_damping · λ_max + max(0, −λ_min) from
# the spectrum of their preparation. LLMEraser settles an unset damping to 0 when the adapter
# was trained with a penalty (as the others want), so for these the preparation computes λ by
# the rule and the requests are given it explicitly.
DAMPING_RULE = ("lowrank",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.10])
    parser.add_argument("--edits", nargs="*", default=["query_edit", "response_edit"])
    parser.add_argument("--solvers", nargs="+", default=list(SOLVER_SETTINGS))
    parser.add_argument("--epochs", type=float, default=DEMO.epochs)
    parser.add_argument("--no-progress", action="store_true")
    options = parser.parse_args()
    progress = not options.no_progress

    assets = ensure_defaults(options.cache_dir, progress=progress)
    corpus, tokenizer, recipe = assets.corpus(), assets.tokenizer(), assets.recipe
    demo = dataclasses.replace(DEMO, epochs=options.epochs)

    def tokenized(items):
        return tokenize_examples(
            items, tokenizer, max_length=recipe.max_length, buckets=recipe.buckets
        )

    examples = corpus.train_examples()
    data = tokenized(examples)
    held_out = tokenized(corpus.held_out_examples())
    initial = attach_lora(assets.model(), demo.lora_settings(), key=jax.random.key(demo.seed))
    config = demo.train_config(len(data))
    original = finetune(nnx.clone(initial), data, config=config, progress=progress)
    print(f"fine-tune: {original.history.wall_seconds:.1f} s, {config.num_steps} steps", flush=True)

    requests = [(f"removal {f:.0%}", _removal(corpus, examples, f)) for f in options.fractions]
    requests += [(kind, _edit(corpus, examples, kind)) for kind in options.edits]
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmeraser_vs_retrain-") as work:
        lineage = pathlib.Path(work)
        # The original training file holds the adapter's text: every request is applied to the
        # original adapter, so it is the right data file for edits too.
        train_file = assets.train_file
        sources = Sources(
            base_model=assets.model_dir, data=train_file, tokenizer=assets.tokenizer_dir
        )
        ledger = Ledger(lineage / DEFAULT_LEDGER_NAME)
        adapter = _save_original(
            original.model,
            lineage / "original",
            ledger,
            assets,
            examples,
            data,
            config,
            demo,
        )
        context = open_context(
            adapter, assets.model_dir, examples=examples, data=data, tokenizer=tokenizer
        )

        settings, prepare_seconds = {}, {}
        for solver in options.solvers:
            settings[solver], prepare_seconds[solver] = _prepare(
                context, SOLVER_SETTINGS[solver], solver in DAMPING_RULE, lineage / solver
            )
            print(f"prepared {solver}: {prepare_seconds[solver]:.1f} s")

        for number, (name, request) in enumerate(requests):
            resolved = resolve_request(request, examples)
            after = tokenized(resolved.examples_after)
            reference = retrain(
                initial, after, config=config, num_examples=len(data), progress=progress
            )
            # After compilation, as the request's own time.
            retrain_seconds = reference.history.wall_seconds - reference.history.compile_seconds
            print(f"{name}: retrain {retrain_seconds:.1f} s after compilation")
            target = tokenized(resolved.replacements) if resolved.replacements else None
            affected = data.subset(resolved.indices)
            base_row = _evaluate(original.model, affected, target, after, held_out, reference.model)
            retrain_row = _evaluate(
                reference.model, affected, target, after, held_out, reference.model
            )
            for solver in options.solvers:
                try:
                    outcome = apply_request(
                        request,
                        adapter=adapter,
                        out=lineage / f"request-{number}-{solver}",
                        sources=sources,
                        method=LLMEraser.name,
                        settings=settings[solver],
                        ledger=ledger.path,
                        preparation=lineage / solver,
                        branch=True,
                        log=lambda line: print(line, flush=True),
                    )
                except (NoEffectError, ObjectiveWorsenedError, kernels.SolverError) as error:
                    rows.append(
                        {
                            "request": name,
                            "solver": solver,
                            "refused": f"{type(error).__name__}: {error}",
                            "prepare_seconds": prepare_seconds[solver],
                            "retrain_seconds": retrain_seconds,
                            "original": base_row,
                            "retrained": retrain_row,
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                model = open_adapter(outcome.adapter, assets.model_dir).model
                row = _evaluate(model, affected, target, after, held_out, reference.model)
                rows.append(
                    _compare(
                        name,
                        solver,
                        row,
                        base_row,
                        retrain_row,
                        outcome.figures,
                        prepare_seconds[solver],
                        retrain_seconds,
                        original.model,
                        model,
                        reference.model,
                    )
                )
                print(json.dumps(rows[-1]), flush=True)

    RESULTS.mkdir(exist_ok=True)
    figures = {
        "recipe": dataclasses.asdict(demo),
        # As given to apply_request (a damping chosen by the rule is filled in).
        "solvers": {name: dataclasses.asdict(settings[name]) for name in options.solvers},
        "scored_tokens": "response tokens, end-of-sequence token included",
        "rows": rows,
    }
    (RESULTS / "llmeraser_vs_retrain.json").write_text(json.dumps(figures, indent=2))
    columns = [
        "request",
        "solver",
        "moved",
        "mia_moved",
        "retain_ppl_ratio",
        "distance_to_retrain",
        "kl_affected",
        "unlearn_seconds",
        "prepare_seconds",
        "unlearn_over_retrain",
        "refused",
    ]
    table = markdown_table(rows, columns)
    (RESULTS / "llmeraser_vs_retrain.md").write_text(
        "# LLMEraser against retraining on the embedded default\n\n"
        "`moved`: forget-gap closed for removals (metrics.md); for edits, the fraction of the "
        "retrain's drop in mean NLL of the new responses that the update achieves. "
        "`mia_moved`: (AUC_method − AUC_original) / (AUC_retrain − AUC_original), LOSS attack, "
        "affected vs held-out examples (removals only). Seconds are wall-clock after "
        "compilation. `refused`: apply_request refused the update (nothing was written), and "
        "why.\n\n" + table + "\n"
    )
    print(table)


def _save_original(model, path, ledger, assets, examples, data, config, demo):
    """Saves the fine-tuned adapter as the root of `ledger`'s lineage, as the demo does."""
    save_root_adapter(
        model,
        path,
        provenance=assets.training_provenance(examples, data, config),
        ledger=ledger.path,
        lora_settings=demo.lora_settings(),
    )
    return path


def _prepare(context, settings, damping_rule, path):
    """Makes a solver's preparation at the original adapter and saves it to `path`, where
    apply_request loads it (and checks it against the adapter) for every request.

    With `damping_rule`, λ is chosen from the preparation's spectrum by the rule (the low-rank
    route's comes from its own Lanczos run) and the returned settings carry it.

    Returns:
        The settings to give apply_request, and the preparation's wall-clock.
    """
    method = LLMEraser()
    if damping_rule:
        # The spectrum and eigenbasis do not depend on λ: prepare at λ = 0, then apply the rule.
        at_zero = dataclasses.replace(
            settings, curvature=dataclasses.replace(settings.curvature, damping=0.0)
        )
        prepared = method.prepare(context, method.settle(at_zero, context)[0])
        damping = float(
            curvature.choose_damping(
                prepared.value.spectrum, relative=settings.curvature.relative_damping
            )
        )
        settings = dataclasses.replace(
            settings, curvature=dataclasses.replace(settings.curvature, damping=damping)
        )
        prepared = dataclasses.replace(
            prepared,
            value=dataclasses.replace(prepared.value, damping=damping),
            settings_key=method.preparation_key(method.settle(settings, context)[0]),
        )
    else:
        prepared = method.prepare(context, method.settle(settings, context)[0])
    method.save_preparation(prepared, path)
    return settings, prepared.seconds


def _removal(corpus, examples, fraction) -> Removal:
    people = corpus.forget_split(fraction)
    return Removal(e.id for e in examples if e.metadata["person_id"] in people)


def _edit(corpus, examples, kind):
    """Edits of the 5% forget split's question-answer (query) or fact (response) examples."""
    people = corpus.forget_split(0.05)
    mine = [e for e in examples if e.metadata["person_id"] in people]
    if kind == "query_edit":
        return QueryEdit(
            {
                e.id: "Please answer briefly. " + e.prompt
                for e in mine
                if e.metadata.get("kind") == "qa"
            }
        )
    # A correction: each fact now states another (held-out) person's value of the same field.
    donors = corpus.held_out
    edits = {}
    for i, e in enumerate(x for x in mine if x.metadata.get("kind") == "fact"):
        value = donors[i % len(donors)].pii(e.metadata["field"])
        edits[e.id] = f" {value}."
    return ResponseEdit(edits)


def _evaluate(model, affected, target, after, held_out, reference):
    scores = score_examples(model, affected)
    row = {
        "affected_loss": float(np.mean(scores.losses)),
        "retain_ppl": perplexity(score_examples(model, after).losses),
        "mia_auc_loss": membership_inference(scores, score_examples(model, held_out))["loss"].auc,
        "kl_affected": float(np.mean(next_token_kl(reference, model, affected))),
    }
    if target is not None:
        row["target_loss"] = float(np.mean(score_examples(model, target).losses))
    return row


def _compare(
    name,
    solver,
    row,
    base,
    retrained,
    figures,
    prepare_seconds,
    retrain_seconds,
    original,
    model,
    reference,
):
    metric = "target_loss" if "target_loss" in row else "affected_loss"
    gap = retrained[metric] - base[metric]
    mia_gap = retrained["mia_auc_loss"] - base["mia_auc_loss"]
    trees = [curvature.split_for_curvature(m)[1] for m in (model, original, reference)]
    return {
        "request": name,
        "solver": solver,
        "moved": (row[metric] - base[metric]) / gap,
        "mia_moved": (row["mia_auc_loss"] - base["mia_auc_loss"]) / mia_gap
        if "target_loss" not in row and mia_gap
        else None,
        "retain_ppl_ratio": row["retain_ppl"] / retrained["retain_ppl"],
        "distance_to_retrain": distance_to_retrain(*trees),
        "kl_affected": row["kl_affected"],
        "kl_affected_original": base["kl_affected"],
        "unlearn_seconds": figures["seconds"],
        "compile_seconds": figures["compile_seconds"],
        "prepare_seconds": prepare_seconds,
        "retrain_seconds": retrain_seconds,
        "unlearn_over_retrain": figures["seconds"] / retrain_seconds,
        "damping": figures["damping"],
        "solver_steps": int(figures["solver_steps"]),
        "original": base,
        "unlearned": row,
        "retrained": retrained,
    }


if __name__ == "__main__":
    main()
