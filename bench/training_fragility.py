"""Why more epochs hurt our prefixes: a few training recipes on one small E2E split.

Every variant trains for ``--epochs`` epochs on the same N examples (same seeded order);
after every epoch the prefix's teacher-forced loss on the held-out MRs' first references is
recorded (``heldout``), and the prefix of the last epoch and of the best dev-loss epoch are
each decoded greedily on the held-out MRs (multi-reference corpus BLEU). Results go to
``bench/out/fragility.json`` after every variant, so a cut run keeps what it finished.

    .venv/bin/python -m bench.training_fragility --n 50 --epochs 8 --test-mrs 30 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers import get_linear_schedule_with_warmup

import common.training as training
from bench.e2e_quality import corpus_bleu, encode, pad_id_of, peft_key_values
from common.config import Settings
from common.data import Example, collate
from common.datasets.e2e import low_data_split, read_e2e
from common.generation import DecodingConfig, generate_texts
from common.model_loading import load_model
from common.prefix_file import Prefix
from common.training import evaluate_loss, output_loss
from common.training_config import TrainingConfig

OUT = Path("bench/out/fragility.json")


def bleu_of(loaded, key_values, test, max_new_tokens=64) -> float:
    prefix = Prefix(key_values, loaded.fingerprint, loaded.architecture)
    outputs: list[str] = []
    for start in range(0, len(test), 10):
        rows = [(prefix, mr.mr) for mr in test[start : start + 10]]
        outputs += generate_texts(loaded, rows, DecodingConfig(max_new_tokens=max_new_tokens))
    return corpus_bleu(outputs, test)


def ours(loaded, split, heldout, config: TrainingConfig) -> dict:
    """train_prefix with the encoder captured, to decode the last epoch as well as the best."""
    captured = {}
    real_build = training.build_prefix_encoder

    def build(*args, **kwargs):
        captured["encoder"] = real_build(*args, **kwargs)
        return captured["encoder"]

    curve: list[float] = []
    pad = pad_id_of(loaded)

    def on_progress(progress):
        if progress.validation_loss is not None:
            kv = captured["encoder"].materialize()
            curve.append(evaluate_loss(loaded.model, kv, heldout, batch_size=8, pad_id=pad))

    training.build_prefix_encoder = build
    try:
        result = training.train_prefix(
            loaded, split.train, config, validation=split.dev, on_progress=on_progress
        )
    finally:
        training.build_prefix_encoder = real_build
    dev = [p.validation_loss for p in result.history if p.validation_loss is not None]
    last = captured["encoder"].materialize()
    return {"dev": dev, "heldout": curve, "best": result.prefix.key_values, "last": last}


def peft(loaded, split, heldout, config: TrainingConfig, projection: bool) -> dict:
    torch.manual_seed(config.seed)
    peft_config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=config.prefix_length,
        prefix_projection=projection,
        encoder_hidden_size=config.mid_dim,
    )
    model = get_peft_model(copy.deepcopy(loaded.model), peft_config)
    pad = pad_id_of(loaded)
    train_set = encode(loaded, split.train, config.prefix_length)
    dev_set = encode(loaded, split.dev, config.prefix_length)
    parameters = [p for p in model.parameters() if p.requires_grad]
    steps = -(-len(train_set) // config.batch_size) * (config.epochs or 1)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    order = random.Random(config.seed)
    dev, curve, best = [], [], None
    for _ in range(config.epochs or 1):
        indices = list(range(len(train_set)))
        order.shuffle(indices)
        for start in range(0, len(indices), config.batch_size):
            batch = collate(
                [train_set[i] for i in indices[start : start + config.batch_size]], pad_id=pad
            )
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = output_loss(logits, batch.labels, "token_mean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            kv = peft_key_values(model, loaded, config.prefix_length).clone()
        dev.append(evaluate_loss(loaded.model, kv, dev_set, batch_size=8, pad_id=pad))
        curve.append(evaluate_loss(loaded.model, kv, heldout, batch_size=8, pad_id=pad))
        if best is None or dev[-1] < best[0]:
            best = (dev[-1], kv)
    assert best is not None
    return {"dev": dev, "heldout": curve, "best": best[1], "last": kv}


VARIANTS = {
    "ours-default": lambda: {},
    "ours-seqsum": lambda: {"loss_reduction": "sequence_sum"},
    "ours-lr1e-4": lambda: {"learning_rate": 1e-4},
    "ours-mid128": lambda: {"mid_dim": 128},
    "ours-warmup0": lambda: {"warmup_ratio": 0.0},
    "peft-noproj": None,
    "peft-proj": None,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--test-mrs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("embedded", settings=Settings())
    split = low_data_split(read_e2e(), n_train=args.n, n_test=args.test_mrs, seed=args.seed)
    heldout = encode(loaded, [Example(m.mr, m.references[0]) for m in split.test], 10)
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    for name in args.variants:
        started = time.perf_counter()
        config = TrainingConfig(epochs=args.epochs, seed=args.seed)
        if name.startswith("peft"):
            run = peft(loaded, split, heldout, config, projection=name == "peft-proj")
        else:
            for key, value in VARIANTS[name]().items():
                setattr(config, key, value)
            run = ours(loaded, split, heldout, config)
        record = {
            "variant": name,
            "n": args.n,
            "seed": args.seed,
            "epochs": args.epochs,
            "test_mrs": args.test_mrs,
            "dev_loss": run["dev"],
            "heldout_loss": run["heldout"],
            "bleu_last": bleu_of(loaded, run["last"], split.test),
            "bleu_best_dev": bleu_of(loaded, run["best"], split.test),
            "seconds": time.perf_counter() - started,
        }
        results.append(record)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
