"""A Gradio form generated from a pydantic model: one widget per field, chosen by the field's type.

The UI edits one typed object (`RunConfig`). Widgets are derived from the model's fields, so a new
config field appears in the form without touching the UI, and the values go back through the
model's own validation (`model_validate`), never through a hand-written widget->dict mapping.
"""
from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import gradio as gr
from pydantic import BaseModel, ValidationError


@dataclass
class FieldKind:
    """What a field holds, reduced to what a widget needs."""

    kind: str  # "choice" | "bool" | "int" | "float" | "str" | "list"
    optional: bool
    choices: list[Any] | None = None


def field_kind(annotation: Any) -> FieldKind:
    """Map a type annotation (Literal, bool, int, float, str, list[str], X | None) to a widget kind."""
    optional = False
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        optional = len(args) < len(get_args(annotation))
        annotation = args[0] if len(args) == 1 else str
        origin = get_origin(annotation)
    if origin is Literal:
        return FieldKind("choice", optional, list(get_args(annotation)))
    if origin in (list, tuple, set):
        return FieldKind("list", optional)
    if annotation is bool:
        return FieldKind("bool", optional)
    if annotation is int:
        return FieldKind("int", optional)
    if annotation is float:
        return FieldKind("float", optional)
    return FieldKind("str", optional)


def _label(name: str) -> str:
    return name.replace("_", " ")


class ModelForm:
    """Widgets for every field of `model_cls`, in field order, plus value <-> model conversion."""

    def __init__(self, model_cls: type[BaseModel], *, choices: dict[str, list[str]] | None = None,
                 groups: dict[str, list[str]] | None = None, columns: int = 3):
        self.model_cls = model_cls
        self.names: list[str] = list(model_cls.model_fields)
        self.kinds = {n: field_kind(f.annotation) for n, f in model_cls.model_fields.items()}
        self.choices = choices or {}
        self.groups = groups or {}
        self.columns = columns
        self.widgets: dict[str, gr.components.Component] = {}

    # -- building -------------------------------------------------------------------------
    def _widget(self, name: str, default: Any) -> gr.components.Component:
        info = self.model_cls.model_fields[name]
        kind = self.kinds[name]
        label = _label(name)
        help_text = info.description
        common = dict(label=label, elem_id=f"cfg-{name}", info=help_text)
        if kind.kind == "choice":
            return gr.Dropdown(choices=kind.choices, value=default, **common)
        if kind.kind == "bool":
            return gr.Checkbox(value=bool(default), label=label, elem_id=f"cfg-{name}", info=help_text)
        if kind.kind in ("int", "float"):
            # Optional numbers are text, so "empty" can mean None (gr.Number cannot be empty).
            if kind.optional:
                return gr.Textbox(value="" if default is None else str(default),
                                  placeholder="empty = automatic", **common)
            return gr.Number(value=default, precision=0 if kind.kind == "int" else None, **common)
        if kind.kind == "list":
            return gr.Dropdown(choices=self.choices.get(name, []), value=list(default or []),
                               multiselect=True, allow_custom_value=True, **common)
        if name in self.choices:
            return gr.Dropdown(choices=self.choices[name], value=default, allow_custom_value=True, **common)
        return gr.Textbox(value="" if default is None else str(default), **common)

    def render(self, initial: BaseModel) -> None:
        """Create the widgets inside the current Blocks context, grouped into accordions."""
        values = initial.model_dump()
        placed: set[str] = set()
        order = list(self.groups.items())
        rest = [n for n in self.names if not any(n in g for _, g in order)]
        if rest:
            order.append(("Other", rest))
        for title, names in order:
            names = [n for n in names if n in self.model_cls.model_fields and n not in placed]
            if not names:
                continue
            with gr.Accordion(title, open=title in ("Run", "Schedule")):
                for start in range(0, len(names), self.columns):
                    with gr.Row():
                        for n in names[start:start + self.columns]:
                            self.widgets[n] = self._widget(n, values.get(n))
                            placed.add(n)

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [self.widgets[n] for n in self.names]

    # -- values -------------------------------------------------------------------------------
    def raw_dict(self, values: tuple | list) -> dict[str, Any]:
        """Widget values -> plain dict ready for `model_validate` (blank optional -> None)."""
        out: dict[str, Any] = {}
        for name, value in zip(self.names, values):
            kind = self.kinds[name]
            if isinstance(value, str):
                value = value.strip()
            if kind.optional and (value is None or value == ""):
                out[name] = None
                continue
            if kind.kind == "int" and value not in (None, ""):
                try:
                    value = int(float(value))
                except (TypeError, ValueError):
                    pass  # pydantic reports it with the field name
            elif kind.kind == "float" and value not in (None, ""):
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    pass
            elif kind.kind == "list" and isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif kind.kind == "choice" and kind.choices and value not in kind.choices:
                # Dropdowns hand back strings; Literal[0, 2, 3] wants ints.
                for c in kind.choices:
                    if str(c) == str(value):
                        value = c
            out[name] = value
        return out

    def to_model(self, values: tuple | list) -> tuple[BaseModel | None, list[str]]:
        """(model, []) when valid, else (None, ["field: message", ...])."""
        try:
            return self.model_cls.model_validate(self.raw_dict(values)), []
        except ValidationError as exc:
            msgs = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"]) or "config"
                msgs.append(f"{loc}: {err['msg']}")
            return None, msgs

    def values_of(self, model: BaseModel) -> list[Any]:
        """A model -> widget values (the inverse of `raw_dict`), e.g. for presets and loaded files."""
        data = model.model_dump()
        out = []
        for n in self.names:
            v, kind = data.get(n), self.kinds[n]
            if kind.optional and kind.kind in ("int", "float"):
                out.append("" if v is None else str(v))
            elif kind.kind == "str" and v is None:
                out.append("")
            else:
                out.append(v)
        return out
