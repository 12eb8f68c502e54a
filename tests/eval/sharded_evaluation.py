"""Evaluation and generation on one device and on a data × fsdp × tensor mesh, and a report.

Run by `test_sharded_evaluation.py` in a subprocess with 8 fake CPU devices; prints one JSON
line. One tiny model with random adapters is scored, compared with a second one and asked to
complete prompts, first whole on the default device, then with its variables split over the
mesh and every batch's rows split over data × fsdp.
"""

import json
import sys

import numpy as np
from eval_fixtures import random_dataset, tiny_lora_model
from flax import nnx

from jaxunlearn import parallel
from jaxunlearn.errors import SettingsError
from jaxunlearn.eval import next_token_kl, pii_extraction, score_examples
from jaxunlearn.models import generate


class CharacterTokenizer:
    """Characters to ids 3..63 (0 pads, 2 ends): enough of a tokenizer for `pii_extraction`."""

    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text):
        return {"input_ids": [3 + ord(c) % 61 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + (int(i) - 3) % 26) for i in ids if int(i) > 2)


class Prompt:
    def __init__(self, index):
        self.person_id, self.field = f"person-{index}", "email"
        self.prompt = "The email address of " + "xyzw"[: 1 + index % 4] + " is"
        self.expected_value = "q"


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def evaluate(model, reference, data, prompts, placement):
    scores = score_examples(model, data, batch_size=8, placement=placement)
    kl = next_token_kl(reference, model, data, batch_size=8, placement=placement)
    attempts = pii_extraction(
        model, CharacterTokenizer(), prompts, batch_size=8, max_new_tokens=6, placement=placement
    )
    rng = np.random.default_rng(0)
    prompt_ids = rng.integers(3, 64, size=(8, 5)).astype(np.int32)
    prompt_mask = np.ones_like(prompt_ids)
    prompt_mask[::2, :2] = 0  # left padding on every other row
    generation = generate(model, prompt_ids, prompt_mask, max_new_tokens=7, placement=placement)
    return scores, kl, [a.completion for a in attempts], generation


def main(data_size: int, fsdp_size: int, tensor_size: int) -> None:
    data = random_dataset(13, seed=4)
    prompts = [Prompt(i) for i in range(11)]
    model, reference = tiny_lora_model(seed=0), tiny_lora_model(seed=1)
    single = evaluate(model, reference, data, prompts, parallel.ONE_DEVICE)

    mesh = parallel.make_mesh(data=data_size, fsdp=fsdp_size, tensor=tensor_size)
    placement = parallel.Placement(mesh)
    sharded_model = placement.model(nnx.clone(model))
    sharded_reference = placement.model(nnx.clone(reference))
    sharded = evaluate(sharded_model, sharded_reference, data, prompts, placement)

    try:
        score_examples(sharded_model, data, batch_size=6, placement=placement)
        refusal = None
    except SettingsError as error:
        refusal = str(error)
    tokens = sharded[3].tokens
    print(
        json.dumps(
            {
                "loss_error": relative_error(sharded[0].losses, single[0].losses),
                "min_k_error": relative_error(sharded[0].min_k, single[0].min_k),
                "min_k_plus_plus_error": relative_error(
                    sharded[0].min_k_plus_plus, single[0].min_k_plus_plus
                ),
                "token_counts_equal": bool(
                    np.array_equal(sharded[0].token_counts, single[0].token_counts)
                ),
                "kl": [float(np.mean(single[1])), float(np.mean(sharded[1]))],
                "kl_error": relative_error(sharded[1], single[1]),
                "completions_equal": sharded[2] == single[2],
                "completions": len(single[2]),
                "tokens_equal": bool(np.array_equal(np.asarray(tokens), single[3].tokens)),
                "lengths_equal": bool(
                    np.array_equal(np.asarray(sharded[3].lengths), single[3].lengths)
                ),
                "token_spec": [
                    list(a) if isinstance(a, tuple) else a for a in tokens.sharding.spec
                ],
                "token_devices": len(tokens.sharding.device_set),
                "refusal": refusal,
            }
        )
    )


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
