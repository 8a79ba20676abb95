"""The transformers model format: a ``save_pretrained`` folder, loaded with the class its
config names (or the Auto classes) and saved back as the backbone alone."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from flashar_adapt.formats import FormatError, ModelFormat, dtype_name
from flashar_adapt.patching import backbone_only


def _is_model_class(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, transformers.PreTrainedModel)


class TransformersFormat(ModelFormat):
    """A ``save_pretrained`` folder: config.json + weights. Spec: ``{path: the folder,
    class: a transformers class name (default: the config's ``architectures`` that
    transformers has, then AutoModelForCausalLM, then AutoModel), dtype}``."""

    name = "transformers"
    runner = "transformers"
    spec_keys = ("path", "class", "dtype")
    priority = 10  # generic: family-specific formats get the first look

    @classmethod
    def owns(cls, model):
        return isinstance(model, transformers.PreTrainedModel)

    @classmethod
    def sniff(cls, path):
        path = Path(path)
        if not (path.is_dir() and (path / "config.json").is_file()):
            return None
        return {"path": str(path.resolve())}

    @classmethod
    def load(cls, spec, root=None, overrides=None):
        path = Path(root or ".") / spec.get("path", ".")
        if spec.get("class"):
            names = [spec["class"]]
        else:
            config = json.loads((path / "config.json").read_text())
            if not isinstance(config, dict):
                raise FormatError(f"{path / 'config.json'}: must hold a JSON object, got {type(config).__name__}")
            archs = config.get("architectures") or []
            # a model class transformers has (not a config or tokenizer class of the same module)
            names = [a for a in archs if isinstance(a, str) and _is_model_class(getattr(transformers, a, None))]
            names += ["AutoModelForCausalLM", "AutoModel"]
        kw = {"dtype": getattr(torch, spec["dtype"])} if spec.get("dtype") else {}
        kw.update(overrides or {})
        err = None
        for name in names:
            try:
                return getattr(transformers, name).from_pretrained(str(path), local_files_only=True, **kw).eval()
            except (ValueError, KeyError, OSError) as e:  # this Auto class does not know the config
                err = e
        raise ValueError(f"{path}: transformers could not load this folder ({err})")

    @classmethod
    def save(cls, model, out_dir):
        with backbone_only(model):  # the backbone alone, in save_pretrained layout
            model.save_pretrained(str(out_dir), safe_serialization=True)
        return {"path": ".", "class": type(model).__name__, "dtype": dtype_name(next(model.parameters()).dtype)}
