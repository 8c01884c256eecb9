"""Stage check_generated: does the SGAN's generator cover all ten digits?

The CS229 report's question, made measurable: a fixed batch of generator samples (fixed
noise, the saved best generator) is classified by a fully supervised ceiling; writes the
class histogram, mean confidence and number of classes covered to
metrics/check_generated.json, and plots/generated_classes.png (the histogram beside
the first samples labelled with the ceiling's prediction and confidence).
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from fewlabels.checkpoint import load_trained
from fewlabels.config import DATASET_CLASSES, load_params, resolve_device, run_stage
from fewlabels.evaluation import classify_samples
from fewlabels.io import save_figure, write_json
from fewlabels.models.sgan import sample_z
from fewlabels.paths import METRICS_DIR, PLOTS_DIR


def figure(
    images: torch.Tensor,
    predicted: torch.Tensor,
    confidence: torch.Tensor,
    report: dict,
    classifier: str,
    columns: int = 10,
) -> Figure:
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1, 1.3])
    ax = left.subplots()
    counts = [report["class_counts"][str(c)] for c in range(len(report["class_counts"]))]
    ax.bar(range(len(counts)), counts)
    ax.set_xticks(range(len(counts)))
    ax.set_xlabel(f"class predicted by {classifier}")
    ax.set_ylabel("generated images")
    ax.set_title(
        f"{report['n_samples']} samples: {report['classes_covered']} classes, "
        f"mean confidence {report['mean_confidence']:.2f}"
    )
    shown = min(len(images), 4 * columns)
    axes = right.subplots(shown // columns, columns)
    for i, axis in enumerate(axes.flat):
        axis.imshow(images[i, 0].cpu(), cmap="gray", vmin=0, vmax=1)
        axis.set_title(f"{int(predicted[i])} ({float(confidence[i]):.2f})", fontsize=8)
        axis.axis("off")
    right.suptitle("first samples: predicted class (confidence)")
    return fig


def main() -> None:
    params = load_params()
    cfg = params["check_generated"]
    device = resolve_device(params["device"])
    generator, _ = load_trained("sgan", params["dataset"], part="generator")
    classifier, _ = load_trained(cfg["classifier"], params["dataset"])
    generator.to(device).eval()
    z = sample_z(cfg["n_samples"], generator.z_size, torch.Generator().manual_seed(params["seed"]))
    with torch.no_grad():
        images = torch.cat([generator(chunk.to(device)) for chunk in z.split(500)])
    report = classify_samples(images, classifier.to(device), DATASET_CLASSES[params["dataset"]])
    predicted, confidence = report.pop("predicted"), report.pop("confidence")
    write_json(METRICS_DIR / "check_generated.json", {"classifier": cfg["classifier"], **report})
    print(
        f"generated: {report['classes_covered']} classes covered, mean confidence "
        f"{report['mean_confidence']:.3f} ({cfg['classifier']})"
    )
    fig = figure(images, predicted, confidence, report, cfg["classifier"])
    save_figure(PLOTS_DIR / "generated_classes.png", fig)


if __name__ == "__main__":
    run_stage(main)
