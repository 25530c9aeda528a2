"""The Configure form is generated from RunConfig: every field has a widget, and every preset goes
through the form and back unchanged (the UI edits one typed object, not a widget->dict map)."""
from __future__ import annotations

import gradio as gr
import pytest

from app.forms import ModelForm
from training.config import RunConfig
from training.presets import PRESETS


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_round_trips_through_the_form(preset):
    form = ModelForm(RunConfig)
    cfg, errors = form.to_model(form.values_of(PRESETS[preset]))
    assert errors == []
    assert cfg == PRESETS[preset]


def test_every_config_field_gets_a_widget_of_its_type():
    form = ModelForm(RunConfig)
    with gr.Blocks():
        form.render(PRESETS["smoke"])
    assert set(form.widgets) == set(RunConfig.model_fields)
    assert isinstance(form.widgets["zero_stage"], gr.Dropdown)  # Literal[0, 2, 3]
    assert form.widgets["zero_stage"].choices and len(form.widgets["zero_stage"].choices) == 3
    assert isinstance(form.widgets["lora_experts"], gr.Checkbox)
    assert isinstance(form.widgets["lora_r"], gr.Number)
    assert isinstance(form.widgets["datasets"], gr.Dropdown) and form.widgets["datasets"].multiselect


def test_blank_optional_fields_mean_automatic_and_bad_values_name_the_field():
    form = ModelForm(RunConfig)
    values = form.values_of(PRESETS["smoke"])
    values[form.names.index("max_steps")] = ""
    values[form.names.index("zero_stage")] = "3"  # dropdowns hand back text
    cfg, errors = form.to_model(values)
    assert errors == [] and cfg.max_steps is None and cfg.zero_stage == 3
    values[form.names.index("max_steps")] = "twelve"
    cfg, errors = form.to_model(values)
    assert cfg is None and any(e.startswith("max_steps:") for e in errors), errors


def test_configure_warns_from_the_estimate_not_from_its_own_text():
    """The Configure messages say "run out of GPU memory" exactly when the estimate does not fit."""
    from app.config_tab import describe

    form = ModelForm(RunConfig)
    too_big = PRESETS["smoke"].model_copy(update={"gpu_memory_gib": 0.25})
    messages, memory, command = describe(form, form.values_of(too_big))
    assert "likely out of memory" in memory and "does NOT fit in 0.25 GiB" in memory, memory
    assert "run out of GPU memory" in messages
    assert "deepspeed.launcher.launch" in command.splitlines()[0]
    messages, memory, _ = describe(form, form.values_of(too_big.model_copy(update={"gpu_memory_gib": 80.0})))
    assert "fits in 80 GiB" in memory and "likely out of memory" not in memory, memory
    assert "run out of GPU memory" not in messages


def test_configure_opens_on_this_machines_preset_and_shows_what_max_steps_cuts():
    from app.common import Settings
    from app.config_tab import build, describe
    from training.presets import hardware_preset

    with gr.Blocks():
        tab = build(Settings())
    start = PRESETS[hardware_preset()]
    assert tab["preset"].value == hardware_preset() != "smoke"
    form = tab["form"]
    assert form.widgets["model"].value == start.model and form.widgets["max_steps"].value == str(start.max_steps or "")
    cut = PRESETS["cpu-default"].model_copy(update={"epochs": 3.0})
    messages, _, _ = describe(form, form.values_of(cut))
    assert "max_steps=12 stops the run after" in messages and "of the 3 asked for" in messages, messages
    messages, _, _ = describe(form, form.values_of(cut.model_copy(update={"max_steps": None})))
    assert "max_steps" not in messages, messages
