"""Teacher options side by side on one dataset: test accuracy, macro-F1, fit wall time and cost of each.

Runs trainable.teacher.teacher_inputs (what `python trainable/teacher.py` and a sweep run) for: resnet10t from
scratch; the same from a local ImageNet-format weights file as a linear probe and fine-tuned; a small AST through
the Hugging Face path (teacher.name=hf:<folder>); and the CNN + AST ensemble (cached members reused). Offline, the
weights file and the AST are randomly initialised unless --imagenet-file / --hf name real ones: the timings and
the mechanics are real, the accuracy of "pretrained" rows is that of their starting weights.

    python benchmarks/teacher_options.py --workdir DIR [--epochs E --hf-epochs E --imagenet-file F --hf FOLDER]

DIR is a workdir whose default data exist or are built (python data_prep/build.py workdir=DIR).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import timm
import torch

from common.cli import compose
from data_prep.dataset import prepare_data
from trainable.teacher import MEMBER_FILE, TEACHER_FILE, teacher_dir, teacher_inputs
from trainable.teacher_spec import member_specs


def small_ast(folder: Path, sample_rate: int, clip_seconds: float) -> Path:
    """A randomly initialised AST sized for a CPU (4 layers, hidden 96), its extractor framing our clips."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    if not (folder / "config.json").is_file():
        frames = int(clip_seconds * 100) + 1  # Kaldi fbank: 10 ms shift
        torch.manual_seed(0)
        ASTForAudioClassification(
            ASTConfig(
                hidden_size=96, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384, max_length=frames
            )
        ).save_pretrained(folder)
        ASTFeatureExtractor(max_length=frames, sampling_rate=sample_rate).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=4, help="teacher.epochs of the timm options")
    parser.add_argument("--hf-epochs", type=int, default=3, help="teacher.epochs of the AST")
    parser.add_argument(
        "--imagenet-file",
        type=Path,
        default=None,
        help="real ImageNet weights of resnet10t (default: random weights in that format)",
    )
    parser.add_argument(
        "--hf", type=Path, default=None, help="a save_pretrained AST folder (default: a small random one)"
    )
    parser.add_argument("--only", default=None, help="comma-separated option labels to run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    workdir = args.workdir.resolve()
    base = [f"workdir={workdir}", "kd.enabled=true", f"teacher.epochs={args.epochs}"]
    data = prepare_data(compose("config", base)["data"], workdir)
    weights = args.imagenet_file
    if weights is None:
        weights = workdir / "bench-weights" / "resnet10t-imagenet-format.pth"
        if not weights.is_file():
            weights.parent.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(0)
            torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), weights)
    ast = args.hf or small_ast(
        workdir / "bench-weights" / "ast-small", data.sample_rate, compose("config", base)["data"]["clip_seconds"]
    )
    hf = [f"teacher.name=hf:{ast}", f"teacher.epochs={args.hf_epochs}", "teacher.lr=1e-4", "teacher.batch_size=32"]
    options = {
        "scratch": [],
        "probe": [f"teacher.pretrained={weights}", "teacher.freeze=true"],
        "finetune": [f"teacher.pretrained={weights}", "teacher.lr=1e-3"],
        "ast": hf,
        "ensemble": [
            f"teacher.members=[{{name: resnet10t}}, {{name: 'hf:{ast}', epochs: {args.hf_epochs}, "
            f"lr: 1e-4, batch_size: 32}}]"
        ],
    }
    wanted = args.only.split(",") if args.only else list(options)
    rows = []
    for label in wanted:
        config = compose("config", base + options[label])
        start = time.perf_counter()
        teacher_inputs(config, data)
        seconds = time.perf_counter() - start
        folder = teacher_dir(config, data)
        report = json.loads((folder / TEACHER_FILE).read_text())
        fits = [json.loads((Path(m) / MEMBER_FILE).read_text())["fit_seconds"] for m in report["members"]]
        rows.append((label, report, seconds, sum(fits), len(member_specs(config))))
    print(
        f"\n{len(data.splits['train'])} train / {len(data.splits['test'])} test clips, {data.num_classes} families, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(
        f"{'option':<10}{'members':>8}{'test acc':>10}{'test F1':>9}{'valid acc':>10}{'GMACs':>8}{'fit s':>8}"
        f"{'call s':>8}"
    )
    for label, r, seconds, fit, members in rows:
        print(
            f"{label:<10}{members:>8}{r['test']['acc']:>10.4f}{r['test']['macro_f1']:>9.4f}{r['valid']['acc']:>10.4f}"
            f"{r['macs'] / 1e9:>8.3f}{fit:>8.0f}{seconds:>8.0f}"
        )
    print("(fit s: epoch seconds of its members' training; call s: this call, data and caches included)")


if __name__ == "__main__":
    main()
