"""What a user reads about a config file: YAML loaded without silently dropping a duplicate key, and validation
errors at the dotted path the user writes (pydantic's own paths name union members, which are not keys)."""
from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError


def _path(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def _resolve(tp: Any, disc: str | None = None) -> tuple[Any, str | None]:
    """A field type without Annotated and Optional wrappers, and the union discriminator found on the way."""
    while tp is not None:
        origin = get_origin(tp)
        if origin is Annotated:
            args = get_args(tp)
            for meta in args[1:]:
                found = getattr(meta, "discriminator", None)
                disc = found if isinstance(found, str) else disc
            tp = args[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp, disc
            tp = members[0]
        else:
            break
    return tp, disc


def _union_members(tp: Any) -> list | None:
    if get_origin(tp) in (Union, types.UnionType):
        return [a for a in get_args(tp) if a is not type(None)]
    return None


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tags(member: Any, disc: str) -> tuple:
    member, _ = _resolve(member)
    if _is_model(member) and disc in member.model_fields:
        return get_args(member.model_fields[disc].annotation)
    return ()


def _member(members: list, label: Any, disc: str | None) -> Any:
    """The union member pydantic labelled `label` in an error's loc (its tag, or its class name)."""
    for m in members:
        if (label in _tags(m, disc)) if disc else (_is_model(_resolve(m)[0]) and _resolve(m)[0].__name__ == label):
            return m
    return None


def _child(tp: Any, part: Any) -> tuple[Any, str | None]:
    if _is_model(tp):
        field = tp.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None, None
        return field.annotation, field.discriminator if isinstance(field.discriminator, str) else None
    origin, args = get_origin(tp), get_args(tp)
    if origin in (list, set, frozenset) and args:
        return args[0], None
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0], None
        return (args[part], None) if isinstance(part, int) and part < len(args) else (None, None)
    if origin is dict and len(args) == 2:
        return args[1], None
    return None, None


def _user_loc(loc: tuple, model: type[BaseModel]) -> tuple[list, bool, Any, str | None]:
    """An error's loc as the user writes the path: without the segments pydantic adds for a union's members
    (a discriminator tag such as 'autoencoder_kl', or 'float' / "literal['auto']"), which are not keys.
    Also: whether a smart (undiscriminated) union's label was dropped, and the type and discriminator at the end."""
    tp, disc = model, None
    out: list = []
    alternative = False
    for part in loc:
        tp, disc = _resolve(tp, disc)
        members = _union_members(tp)
        if members is not None:
            alternative = alternative or not disc
            tp, disc = _member(members, part, disc), None
            continue
        out.append(part)
        tp, disc = _child(tp, part)
    tp, disc = _resolve(tp, disc)
    return out, alternative, tp, disc


def _message(e: dict, tp: Any, disc: str | None) -> tuple[str, str]:
    """(extra path segment, message) for one pydantic error."""
    kind = e["type"]
    if kind == "extra_forbidden":
        return "", "unknown key (not a field of this section)"
    members = _union_members(tp)
    if kind in ("union_tag_not_found", "union_tag_invalid") and members and disc:
        tags = [t for m in members for t in _tags(m, disc)]
        choices = ", ".join(repr(t) for t in tags)
        if kind == "union_tag_invalid":
            tag = e["input"].get(disc) if isinstance(e["input"], dict) else e.get("ctx", {}).get("tag")
            return disc, f"{tag!r} is not a valid {disc}; choose one of {choices}"
        message = f"no {disc} given; set {disc} to one of {choices}"
        if isinstance(e["input"], dict):
            known = {name for m in members if _is_model(_resolve(m)[0]) for name in _resolve(m)[0].model_fields}
            unknown = [k for k in e["input"] if k not in known]
            if unknown:
                message += f" ({', '.join(repr(k) for k in unknown)}: not a key of any {disc})"
        return "", message
    return "", e["msg"]


def _closest_key(loc: tuple, model: type[BaseModel]) -> str:
    """"; did you mean 'x'?" for an unknown key close to a key of its section, else ""."""
    parent = _user_loc(loc[:-1], model)[2]
    if not _is_model(parent) or not isinstance(loc[-1], str):
        return ""
    close = difflib.get_close_matches(loc[-1], list(parent.model_fields), n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def format_errors(error: ValidationError, source: str, model: type[BaseModel]) -> str:
    """One line per problem, at the dotted path a user writes; the alternatives of a plain union (a number or
    'auto') are one problem. `model`: the validated class, whose field types tell which loc segments name a
    union member rather than a key."""
    lines: list[tuple[str, list[str]]] = []
    alternatives: dict[str, list[str]] = {}
    for e in error.errors():
        loc, alternative, tp, disc = _user_loc(tuple(e["loc"]), model)
        extra, msg = _message(e, tp, disc)
        if e["type"] == "extra_forbidden":
            msg += _closest_key(tuple(e["loc"]), model)
        path = _path(loc + ([extra] if extra else []))
        if not alternative:
            lines.append((path, [msg]))
        elif path in alternatives:
            alternatives[path].append(msg)
        else:
            lines.append((path, alternatives.setdefault(path, [msg])))
    return "\n".join([f"{source}: {len(lines)} problem(s)"] + [f"  {path}: {' | '.join(msgs)}" for path, msgs in lines])


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (plain data only, no Python objects) that refuses a key written twice in one
    mapping: YAML keeps the last silently, so a second `curation:` section would erase the first."""

    def __init__(self, stream):
        super().__init__(stream)
        self._parents: dict[int, tuple] = {}  # id(node) -> (node, parent node, key node or list index)
        self.duplicates: list[str] = []

    def compose_node(self, parent, index):
        node = super().compose_node(parent, index)
        if node is not None and id(node) not in self._parents:
            self._parents[id(node)] = (node, parent, index)
        return node

    def _node_path(self, node) -> list:
        parts: list = []
        while node is not None and id(node) in self._parents:
            _, parent, index = self._parents[id(node)]
            if parent is None:
                break
            parts.append(index if isinstance(index, int) else getattr(index, "value", str(index)))
            node = parent
        return parts[::-1]

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` merges keys that the mapping's own keys override, by design
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if first is not key_node:
                    self.duplicates.append(
                        f"duplicate key {_path(self._node_path(node) + [key])} at line {key_node.start_mark.line + 1}"
                        f" (first at line {first.start_mark.line + 1})")
        return super().construct_mapping(node, deep=deep)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping with the same key twice."""


def load_yaml(text: str):
    """Like yaml.safe_load, but a duplicate key is an error (DuplicateKeyError, naming its path and line)."""
    loader = _UniqueKeyLoader(text)
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    if loader.duplicates:
        raise DuplicateKeyError("; ".join(loader.duplicates) + ": YAML would keep only the last of each, silently; "
                                "merge them into one")
    return data
