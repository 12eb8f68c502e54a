"""Does a LoRA fine-tune on the embedded default memorize private data?

Fine-tunes LoRA adapters of the default base model on the trained people of the default
synthetic corpus, then prompts with each PII value's training context and decodes greedily.
Prints the PII extraction recall for trained people against held-out people (never trained
on), and the fine-tune's wall-clock. Writes the figures as JSON to experiments/results/.

    python experiments/finetune_memorization.py      # builds the default once (a few minutes)
    python experiments/finetune_memorization.py --epochs 10 --rank 16
"""

import argparse
import dataclasses
import json
import pathlib
import time

import jax

from jaxunlearn.adapter import LoraSettings, attach_lora
from jaxunlearn.data import tokenize_examples
from jaxunlearn.defaults import ensure_defaults
from jaxunlearn.eval import extraction_recall, pii_extraction
from jaxunlearn.models import LORA_TARGETS
from jaxunlearn.train import TrainConfig, finetune

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="cache of the embedded default")
    parser.add_argument("--epochs", type=float, default=30.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=64.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    options = parser.parse_args()

    assets = ensure_defaults(options.cache_dir, progress=not options.no_progress)
    corpus = assets.corpus()
    tokenizer = assets.tokenizer()
    recipe = assets.recipe
    train_data = tokenize_examples(
        corpus.train_examples(), tokenizer, max_length=recipe.max_length, buckets=recipe.buckets
    )
    settings = LoraSettings(rank=options.rank, alpha=options.alpha, targets=LORA_TARGETS)
    model = attach_lora(assets.model(), settings, key=jax.random.key(options.seed))
    steps = max(2, round(options.epochs * len(train_data) / options.batch_size))
    config = TrainConfig(
        learning_rate=options.learning_rate,
        warmup_steps=steps // 10,
        num_steps=steps,
        batch_size=options.batch_size,
        seed=options.seed,
    )
    start = time.perf_counter()
    history = finetune(model, train_data, config=config, progress=not options.no_progress).history
    finetune_seconds = time.perf_counter() - start

    trained = pii_extraction(model, tokenizer, corpus.recall_prompts(corpus.people))
    held_out = pii_extraction(model, tokenizer, corpus.recall_prompts(corpus.held_out))
    base = pii_extraction(assets.model(), tokenizer, corpus.recall_prompts(corpus.people))
    figures = {
        "trained_people": len(corpus.people),
        "held_out_people": len(corpus.held_out),
        "train_examples": len(train_data),
        "lora": dataclasses.asdict(settings),
        "train_config": dataclasses.asdict(config),
        "finetune_seconds": finetune_seconds,
        "final_train_loss": history.losses[-1],
        "pii_recall_trained": extraction_recall(trained),
        "pii_recall_held_out": extraction_recall(held_out),
        "pii_recall_trained_before_finetune": extraction_recall(base),
        "examples": [attempt._asdict() for attempt in trained[:3] + held_out[:3]],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finetune_memorization.json").write_text(json.dumps(figures, indent=2))
    print(
        f"LoRA r={settings.rank} on {len(settings.targets)} projections, {steps} steps "
        f"({options.epochs:g} epochs of {len(train_data)} examples): {finetune_seconds:.1f} s"
    )
    print(f"PII extraction recall, trained people:   {figures['pii_recall_trained']:.3f}")
    print(f"PII extraction recall, held-out people:  {figures['pii_recall_held_out']:.3f}")
    print(
        f"(base model before fine-tuning, trained people: "
        f"{figures['pii_recall_trained_before_finetune']:.3f})"
    )


if __name__ == "__main__":
    main()
