"""Whether an adapter can grade: its validation agreement with the teachers' scores, said plainly
when it is near zero, with what would train a useful one. The one wording for `python -m training
run`, the Runs tab and the Grade tab."""
from __future__ import annotations

from pathlib import Path

from data.run_folder import RunFolder, checkpoint_step

# QWK 0 is chance agreement: below this an adapter's grades are hardly better than guesses.
NEAR_ZERO_QWK = 0.1


def weak_agreement_note(adapter_dir: str | Path | None) -> str | None:
    """For a run's checkpoint whose validation QWK is near zero: what that means and what to
    change (more graded answers, whole epochs, a GPU). None when it agrees better, or when its
    run measured no agreement (no validation data, or whole-submission examples)."""
    if not adapter_dir:
        return None
    adapter = Path(adapter_dir)
    folder = RunFolder(adapter.parent)
    row = folder.validation_at(checkpoint_step(adapter))
    if row is None or row["val_qwk"] >= NEAR_ZERO_QWK:
        return None
    return (f"Validation agreement with the teachers is near zero (QWK {row['val_qwk']:.3f} on "
            f"{row.get('val_n', '?')} held-out answers; 0 is chance): {folder.run_id}/{adapter.name} grades "
            f"little better than a guess, so check every grade it gives. It trained {row.get('step')} steps "
            f"({row.get('epoch', 0):.2g} epochs){_trained_on(folder)}. A useful grader needs more: hundreds of "
            "graded answers (import a gradebook in the Data tab), whole epochs (max_steps=none, epochs=3 or "
            "more), and a GPU (`python -m training run` there takes the embedded-grader recipe).")


def _trained_on(folder: RunFolder) -> str:
    """' on ~N training examples' from the run's config, or '' when its data cannot be read now."""
    from training.checks import training_examples
    from training.config import load_config

    try:
        n = training_examples(load_config(folder.config))
    except (OSError, ValueError):
        return ""
    return f" on ~{n} training examples" if n else ""
