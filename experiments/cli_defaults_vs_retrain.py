"""Does the command line's default path unlearn? `finetune`, `unlearn --forget`, then a retrain.

On the embedded default, as a user would type them (each command in its own process, default
flags unless `--finetune-flags` adds some):

    jaxunlearn finetune --model M --tokenizer T --data train.jsonl --out run
    jaxunlearn unlearn  --model M --tokenizer T --adapter run/adapter --data train.jsonl \
        --forget-file forget.txt --out unlearned
    jaxunlearn finetune --model M --tokenizer T --data retain.jsonl --out retrain  # reference

The forget set is the demo's (the examples of 5% of the trained people). Reports the forget-gap
closed, (loss_unlearned - loss_original) / (loss_retrain - loss_original) on the forget set, and
retain perplexity against the retrain's, next to each command's wall-clock.

    python experiments/cli_defaults_vs_retrain.py      # the defaults as they stand
    python experiments/cli_defaults_vs_retrain.py --name peft_shape --finetune-flags \
        "--rank 8 --alpha 16 --targets q_proj,v_proj"  # PEFT's default adapters

Each default finetune (390 steps) takes about 5 min on 2 CPU cores, the request about 2 min.

Writes experiments/results/cli_defaults_vs_retrain.{json,md} (`--name` changes the stem).
"""

import argparse
import json
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

from jaxunlearn.data import DEFAULT_BUCKETS, load_tokenizer, save_examples, tokenize_examples
from jaxunlearn.defaults import ensure_defaults
from jaxunlearn.eval import forget_gap_closed, markdown_table, perplexity, score_examples
from jaxunlearn.unlearn import open_adapter

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetune-flags", default="", help="added to both finetune commands")
    parser.add_argument("--unlearn-flags", default="", help="added to the unlearn command")
    parser.add_argument("--forget-fraction", type=float, default=0.05)
    parser.add_argument("--name", default="cli_defaults_vs_retrain")
    parser.add_argument("--work", help="keep the runs in this folder (default: a temporary one)")
    options = parser.parse_args()

    assets = ensure_defaults()
    corpus = assets.corpus()
    examples = corpus.train_examples()
    forget_people = set(corpus.forget_split(options.forget_fraction))
    forget_ids = [e.id for e in examples if e.metadata["person_id"] in forget_people]
    retain = [e for e in examples if e.metadata["person_id"] not in forget_people]

    with tempfile.TemporaryDirectory() as scratch:
        work = pathlib.Path(options.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        train_file = assets.train_file
        retain_file, forget_file = work / "retain.jsonl", work / "forget.txt"
        save_examples(retain, retain_file)
        forget_file.write_text("".join(f"{i}\n" for i in forget_ids), encoding="utf-8")
        common = ["--model", str(assets.model_dir), "--tokenizer", str(assets.tokenizer_dir)]
        finetune_flags = shlex.split(options.finetune_flags)
        commands = {
            "finetune": [
                "finetune", *common, "--data", str(train_file), "--out", str(work / "run"),
                "--no-progress", *finetune_flags,
            ],
            "unlearn": [
                "unlearn", *common, "--adapter", str(work / "run" / "adapter"),
                "--data", str(train_file), "--forget-file", str(forget_file),
                "--out", str(work / "unlearned"), *shlex.split(options.unlearn_flags),
            ],
            "retrain": [
                "finetune", *common, "--data", str(retain_file), "--out", str(work / "retrain"),
                "--no-progress", *finetune_flags,
            ],
        }  # fmt: skip
        seconds = {}
        for name, arguments in commands.items():
            print(f"$ jaxunlearn {shlex.join(arguments)}", file=sys.stderr)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "jaxunlearn.cli", *arguments], check=True)
            seconds[name] = time.perf_counter() - start

        adapters = {
            "original": work / "run" / "adapter",
            "unlearned": work / "unlearned",
            "retrained": work / "retrain" / "adapter",
        }
        models = {
            name: open_adapter(path, assets.model_dir).model for name, path in adapters.items()
        }
        tokenizer = load_tokenizer(assets.tokenizer_dir)

        def tokenized(items):
            # As the commands tokenize: the model's context, the default buckets.
            length = models["original"].config.max_position_embeddings
            return tokenize_examples(items, tokenizer, max_length=length, buckets=DEFAULT_BUCKETS)

        forget_data = tokenized([e for e in examples if e.id in set(forget_ids)])
        retain_data = tokenized(retain)
        figures = {}
        for name, model in models.items():
            forget_losses = score_examples(model, forget_data).losses
            retain_losses = score_examples(model, retain_data).losses
            figures[name] = {
                "forget_loss": float(np.mean(forget_losses)),
                "forget_ppl": perplexity(forget_losses),
                "retain_ppl": perplexity(retain_losses),
            }
    reference = figures["retrained"]
    for name in ("original", "unlearned"):
        figures[name]["forget_gap_closed"] = forget_gap_closed(
            figures[name]["forget_loss"],
            figures["original"]["forget_loss"],
            reference["forget_loss"],
        )
        figures[name]["retain_ppl_over_retrain"] = (
            figures[name]["retain_ppl"] / reference["retain_ppl"]
        )
    report = {
        # The paths of this machine as names: DEFAULT (the embedded default's folder), WORK.
        "commands": {
            name: "jaxunlearn "
            + shlex.join(a).replace(str(assets.root), "DEFAULT").replace(str(work), "WORK")
            for name, a in commands.items()
        },
        "seconds": seconds,
        "forget_examples": len(forget_ids),
        "train_examples": len(examples),
        "figures": figures,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{options.name}.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    columns = [
        "adapter",
        "forget_ppl",
        "retain_ppl",
        "forget_gap_closed",
        "retain_ppl_over_retrain",
    ]
    table = markdown_table([{"adapter": name, **f} for name, f in figures.items()], columns)
    timing = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
    flags = f"finetune flags: `{options.finetune_flags}`; unlearn flags: `{options.unlearn_flags}`"
    text = f"# {options.name}\n\n{flags}\n\n{table}\n\n{timing}\n"
    (RESULTS / f"{options.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
