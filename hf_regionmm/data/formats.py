"""Real-format data sets by name, for the command line: `--data refcoco --data-option refs_path=... ...`.

Each name maps to one loader of `hf_regionmm.data.loaders`; every loader returns scenes in the synthetic schema
(`hf_regionmm.data.synthetic.scene_features`), so whatever trains or evaluates on synthetic scenes can take them.
Options are the loader's own parameters, given as strings and converted by the parameter's annotation (`int`,
`bool`; everything else stays a string, e.g. paths).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import loaders

__all__ = ["DATA_FORMATS", "load_data_format", "parse_name_value_pairs"]

DATA_FORMATS: dict[str, Callable[..., Any]] = {
    "coco": loaders.load_coco_detection,
    "refcoco": loaders.load_refcoco,
    "visual_genome": loaders.load_visual_genome_regions,
    "flickr30k_entities": loaders.load_flickr30k_entities,
    "scanrefer": loaders.load_scanrefer,
    "cap3d": loaders.load_cap3d,
}
"""`--data` name -> loader; its parameters are the `--data-option` names."""

_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def parse_name_value_pairs(
    pairs: Sequence[str], accepted: Sequence[str], flag: str, owner: str, example: str = "images_dir=path/to/images"
) -> dict[str, str]:
    """`["name=value", ...]` -> `{name: value}`; each name must be in `accepted`. `flag` (e.g. `--data-option`) and
    `owner` (e.g. `--data coco`) name the option and what takes it in errors."""
    options: dict[str, str] = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not name:
            raise ValueError(f"`{flag}` must look like NAME=VALUE (e.g. {example}); got {pair!r}.")
        if name not in accepted:
            raise ValueError(f"`{flag} {name}` is not an option of {owner}; it takes {list(accepted)}.")
        if name in options:
            raise ValueError(f"`{flag} {name}` is given twice.")
        options[name] = value
    return options


def _convert(value: str, annotation: Any, name: str) -> Any:
    text = str(annotation)
    if text.startswith("bool"):
        if value.lower() not in (*_TRUE, *_FALSE):
            raise ValueError(f"`--data-option {name}` takes true or false; got {value!r}.")
        return value.lower() in _TRUE
    if text.startswith("int"):
        if value.lower() == "none" and "None" in text:
            return None
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"`--data-option {name}` takes an integer; got {value!r}.") from None
    if "None" in text and value.lower() == "none":
        return None
    return value


def load_data_format(name: str, options: Mapping[str, str] | Sequence[str]) -> Any:
    """Load the real-format data set `name` (a key of `DATA_FORMATS`) with the loader parameters in `options`
    (a mapping, or `NAME=VALUE` strings as the command line passes them).

    Raises:
        ValueError: an unknown format, an option the loader does not take, a missing required one, or a value that
            does not convert; each names the option and lists what is accepted.
    """
    if name not in DATA_FORMATS:
        raise ValueError(f"`--data {name}` is not a known data format; choose one of {sorted(DATA_FORMATS)}.")
    loader = DATA_FORMATS[name]
    parameters = inspect.signature(loader).parameters
    if not isinstance(options, Mapping):
        options = parse_name_value_pairs(list(options), list(parameters), "--data-option", f"`--data {name}`")
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise ValueError(
            f"`--data-option {unknown[0]}` is not an option of `--data {name}`; it takes {list(parameters)}."
        )
    missing = [
        parameter_name
        for parameter_name, parameter in parameters.items()
        if parameter.default is inspect.Parameter.empty and parameter_name not in options
    ]
    if missing:
        listed = " ".join(f"--data-option {parameter_name}=..." for parameter_name in missing)
        raise ValueError(f"`--data {name}` needs {listed}.")
    arguments = {key: _convert(str(value), parameters[key].annotation, key) for key, value in options.items()}
    return loader(**arguments)
