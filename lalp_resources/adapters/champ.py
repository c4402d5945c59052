"""Reader for the ``champ`` format: the CHAMP dataset shipped by the ``champ-dataset``
package (or a file of the same layout); conversations numbered by position (0-based).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

from lalp_resources.adapters.common import (
    Collector,
    ConfigError,
    IngestResult,
    ReadContext,
    RowError,
    as_id,
    as_optional_answer,
    as_text,
    check_limits,
    file_uri,
    require,
    sha256_file,
)

CHAMP_ZERO_SHOT = "0-Shot"
CHAMP_SPECS = ("champ", "champ:v0")
TEACHER_MODES = ("model", "model+setting")
_CHAMP_SUMMARY_PROMPT = "Now, summarize the answer above"


def is_champ_spec(source: Any) -> bool:
    """``"champ"`` / ``"champ:v0"``: the packaged dataset rather than a path."""
    return isinstance(source, str) and source.strip().lower() in CHAMP_SPECS


def champ_path() -> Path:
    """The packaged CHAMP file (``champ_dataset/dataset_files/v0.json``), read in place.
    Raises ConfigError (a ValueError) when the package is missing (a setup problem, not a data problem)."""
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or spec.origin is None:
        raise ConfigError("source 'champ' needs the champ-dataset package (pip install champ-dataset)")
    path = Path(spec.origin).parent / "dataset_files" / "v0.json"
    if not path.is_file():
        raise ConfigError(f"champ-dataset is installed but {path} is missing")
    return path


def champ_uri(path: Path) -> str:
    try:
        packaged = path.resolve() == champ_path().resolve()
    except ConfigError:
        packaged = False
    if packaged:
        try:
            version = importlib.metadata.version("champ-dataset")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return f"champ-dataset=={version}:champ_dataset/dataset_files/v0.json"
    return file_uri(path)


def read_champ(path: Path, ctx: ReadContext) -> IngestResult:
    """CHAMP (Mao et al. 2024; ``champ-dataset`` on PyPI, MIT) as teacher traces.

    File structure (``v0.json``): ``{"problems": {id: problem}, "concepts": ..., "hints": ...}``.
    Each of the 270 problems has ``identifier`` ("P_Combinatorics_1"), ``_text`` (problem,
    ``@@`` math markers removed), ``_answer`` (reference answer, plain text), ``solution``,
    ``fws_annotations`` and ``conversations``: 72 entries keyed ``"<model>|<setting>"`` for
    4 models (GPT-3.5, GPT-4, GPT-4 Turbo, PaLM 2 Medium) x 18 prompt settings ("0-Shot",
    "5-Shot", "1/3 Soln", ...). A conversation is ``{"messages": [{role, text, error}]}``
    with roles System / User / Imputation / ``Model.<model>``; it ends with the model's
    solution, a User turn "Now, summarize the answer above in one sentence..." and the
    model's one-sentence summary. ``error == "LENGTH_CURRENT"`` marks a solution cut by
    the length limit (its summary is then null, ``"LENGTH_PREVIOUS"``).

    Mapping: prompt_id = identifier; prompt = ``_text`` (the problem alone, not the
    setting-specific user turn); reference_answer = ``_answer``; response = the model turn
    just before the summarize request (or the last model turn); final_answer = the
    summary sentence (null if absent, then extracted from the response downstream).
    teacher = model (``teacher_mode="model"``, default settings: 0-shot only) or
    ``"model/setting"`` (``teacher_mode="model+setting"``, default: all 18 settings).
    In "model" mode with several settings, later settings of a (problem, model) pair are
    quarantined as ``conflicting_duplicate`` by dedupe (one response per teacher and prompt).
    source_row = 0-based index of the conversation over the whole file (problem order,
    then conversation order), whatever settings are selected; n_read counts only the
    selected conversations (1,080 by default, 19,440 for all settings).
    A file that is not a CHAMP layout is one ``invalid_json`` / ``invalid_type`` row;
    an unknown ``teacher_mode`` or CHAMP setting raises ConfigError (a configuration mistake).
    """
    path = Path(path)
    teacher_mode = ctx.teacher_mode
    if teacher_mode not in TEACHER_MODES:
        raise ConfigError(f"unknown teacher_mode {teacher_mode!r}; use 'model' or 'model+setting'")
    col = Collector(champ_uri(path), sha256_file(path), "champ", "conversation", ctx.limits)
    data = path.read_bytes()
    try:
        root = json.loads(data.decode("utf-8-sig"))
    except Exception as exc:  # noqa: BLE001 - UnicodeDecodeError, JSONDecodeError, RecursionError
        col.fail_file("invalid_json", f"not a CHAMP dataset file: {str(exc)[:200]}", data[:1200])
        return col.result()
    del data
    problems = root.get("problems") if isinstance(root, dict) else None
    if not isinstance(problems, dict):
        col.fail_file("invalid_type", "not a CHAMP dataset file: expected {'problems': {...}}", root)
        return col.result()

    all_settings: list[str] = []
    for p in problems.values():
        convs = p.get("conversations") if isinstance(p, dict) else None
        for key in convs if isinstance(convs, dict) else ():
            setting = key.split("|", 1)[-1]
            if setting not in all_settings:
                all_settings.append(setting)
    if ctx.champ_settings is None:
        selected = set(all_settings) if teacher_mode == "model+setting" else {CHAMP_ZERO_SHOT}
    else:
        unknown = [s for s in ctx.champ_settings if s not in all_settings]
        if unknown:
            raise ConfigError(f"unknown CHAMP setting(s) {unknown}; known: {all_settings}")
        selected = set(ctx.champ_settings)

    idx = -1
    for pkey, p in problems.items():
        convs = p.get("conversations") if isinstance(p, dict) else None
        if not isinstance(convs, dict):
            continue
        for ckey, conv in convs.items():
            idx += 1
            model, _, setting = ckey.partition("|")
            if setting not in selected:
                continue
            col.n_read += 1
            teacher = model if teacher_mode == "model" else f"{model}/{setting}"
            raw = {"problem": pkey, "conversation": ckey,
                   "messages": conv.get("messages") if isinstance(conv, dict) else conv}
            try:
                fields = champ_fields(p, conv, teacher, ctx)
            except RowError as err:
                col.reject(idx, err.reason, f"{pkey} / {ckey}: {err.detail}", raw, p.get("identifier", pkey), teacher)
                continue
            col.accept(idx, raw, **fields)
    return col.result()


def champ_fields(p: dict, conv: Any, teacher: str, ctx: ReadContext) -> dict:
    prompt_id = as_id(require(p, "identifier"), "identifier")
    prompt = as_text(require(p, "_text"), "_text")
    check_limits(ctx.limits, prompt_id=prompt_id, teacher=teacher, prompt=prompt)
    reference = as_optional_answer(p.get("_answer"), "_answer")
    msgs = conv.get("messages") if isinstance(conv, dict) else None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise RowError("invalid_type", "conversation has no list of message objects")
    is_model = [str(m.get("role", "")).startswith("Model.") for m in msgs]
    summ = max(
        (k for k, m in enumerate(msgs)
         if m.get("role") == "User" and str(m.get("text") or "").startswith(_CHAMP_SUMMARY_PROMPT)),
        default=None,
    )
    if summ is not None and summ > 0 and is_model[summ - 1]:
        resp_k = summ - 1
        summary = msgs[summ + 1].get("text") if summ + 1 < len(msgs) and is_model[summ + 1] else None
    else:
        resp_k = max((k for k, flag in enumerate(is_model) if flag), default=None)
        summary = None
        if resp_k is None:
            raise RowError("missing_field", "conversation has no model turn")
    text = msgs[resp_k].get("text")
    if text is None:
        raise RowError("empty_response", f"model turn has no text (error={msgs[resp_k].get('error')!r})")
    return {
        "prompt_id": prompt_id,
        "teacher": teacher,
        "prompt": prompt,
        "response": as_text(text, "text"),
        "reference_answer": reference,
        "final_answer": summary if isinstance(summary, str) else None,
    }
