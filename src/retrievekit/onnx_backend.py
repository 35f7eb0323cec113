"""The ONNX engine: export a model once, check it against torch, cache it, run it.

An embedder is exported whole (transformer, pooling, normalization: the sentence-transformers
forward as one graph), a cross-encoder as its sequence-classification model (logits). Both
run with onnxruntime on the CPU and tokenize with the model's own fast tokenizer (the
`tokenizers` library), so a cached model runs without loading torch.

Cache: one folder per model content hash (`retrievekit.models.model_fingerprint`), beside a
local model (`<model>/onnx/retrievekit/<hash>/`) when that folder is writable and not inside
site-packages, else under `$RETRIEVEKIT_CACHE/onnx/<hash>/` (default
`$XDG_CACHE_HOME/retrievekit` or `~/.cache/retrievekit`). Each variant (`embed-fp32`,
`embed-int8`, `rerank-fp32`, ...) is a `.onnx` file plus a `.json` record of its check: files
are written to temporary names and renamed, under a file lock.

Check: right after export, the ONNX model and fp32 torch run a fixed probe set (short, long
past the truncation length, unicode, odd whitespace, empty; every prefix in use). An export
whose largest deviation exceeds `TOLERANCE` is refused: the engine falls back to torch with a
warning, and the failure is recorded so it is not retried on every load (delete the record,
or upgrade torch, to try again). A cached file whose hash no longer matches its record is
refused the same way.

When: `load(export=False)` only opens a checked export that is already cached (what
backend="auto" does, so that first use never waits for an export); `load(export=True)` (what
backend="onnx" and `ModelEngines.export_onnx` do) exports first when needed, with a progress
bar of its stages on a terminal.

Network: onnxruntime's official builds start a telemetry uploader when the library is first
imported, which looks up its collector host on a timer. Only `ORT_DISABLE_TELEMETRY=1`, read at
that import, stops it (`onnxruntime.disable_telemetry_events()` does not stop the lookups; both
checked with strace, see docs/design.md). `require_onnxruntime`, the one place that imports
onnxruntime, sets it unless the user set it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import MissingDependencyError, RetrieveKitError
from .inference import resolve_num_threads
from .models import ResolvedModel, model_fingerprint

logger = logging.getLogger(__name__)

#: Bumped when the export or the record format changes; part of every record.
EXPORT_FORMAT = 1
#: The largest deviation from fp32 torch an export may show on the probe set.
#: embed: max over probes of max(1 - cosine, relative norm difference);
#: rerank: max |logit difference| / max(1, max |torch logit|).
TOLERANCE: dict[tuple[str, str], float] = {
    ("embed", "fp32"): 1e-4,
    ("embed", "int8"): 0.05,
    ("rerank", "fp32"): 1e-3,
    ("rerank", "int8"): 0.25,
}
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_INSTALL = "pip install 'retrievekit[onnx]'"

EMBED_PROBES: tuple[str, ...] = (
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing whitespace  ",
    "MiXeD CaSe and unicode: café, naïve, Tōkyō 東京, Привет, 🙂",
    "x",
    "",
    "tabs\tand\nnewlines\r\nin text",
    "Sourdough bread is leavened with a fermented starter of flour and water; the long "
    "fermentation gives it a sour taste and a chewy crumb, and it keeps longer than bread "
    "made with baker's yeast.",
    " ".join(["retrieval augmented generation with hybrid search"] * 120),  # past truncation
)
RERANK_PROBES: tuple[tuple[str, str], ...] = (
    ("what is the capital of France?", "Paris is the capital and largest city of France."),
    ("what is the capital of France?", "Bananas are rich in potassium."),
    ("MiXeD CaSe ÜNICODE 東京", "  leading and trailing whitespace  "),
    ("q", ""),
    ("does green tea contain caffeine",
     " ".join(["Green tea contains catechins and less caffeine than coffee."] * 80)),
    (" ".join(["a very long query"] * 200), "short passage"),
)

_warned: set[str] = set()
_warned_lock = threading.Lock()


class OnnxUnavailable(RetrieveKitError, RuntimeError):
    """The ONNX engine cannot serve this model; the message says why (torch serves it)."""


class NotExported(OnnxUnavailable):
    """No checked export is cached yet, and this load may not make one."""


def require_onnxruntime() -> Any:
    """Import onnxruntime with its telemetry off, or raise the error that names the install."""
    if "onnxruntime" not in sys.modules:
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # read once, at the first import
    elif "ORT_DISABLE_TELEMETRY" not in os.environ:
        warn_once("ort-telemetry", "onnxruntime was imported before retrievekit could turn its "
                  "telemetry off, so it may look up its telemetry host; set "
                  "ORT_DISABLE_TELEMETRY=1 in the environment to stop that")
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            f"backend='onnx' needs onnxruntime: {_INSTALL} (or use backend='torch')") from exc
    onnxruntime.disable_telemetry_events()  # the events, where the variable came too late
    return onnxruntime


def warn_once(key: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
    """Log once per process for each `key` (loads repeat; the advice doesn't)."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.log(level, message, *args)


# -- the cache ---------------------------------------------------------------------------------
def user_cache_dir() -> Path:
    """`$RETRIEVEKIT_CACHE`, else `$XDG_CACHE_HOME/retrievekit`, else `~/.cache/retrievekit`."""
    env = os.environ.get("RETRIEVEKIT_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "retrievekit"


def _beside_model_ok(model_dir: Path) -> bool:
    if any(part in ("site-packages", "dist-packages") for part in model_dir.parts):
        return False
    target = model_dir / "onnx"
    probe = target if target.is_dir() else model_dir
    return os.access(probe, os.W_OK | os.X_OK)


def content_key(resolved: ResolvedModel) -> str | None:
    """The content hash that names a model's cache folder, or None when it cannot be known
    (a hub model not in the local Hugging Face cache)."""
    return model_fingerprint(resolved) or None


def cache_dir_for(resolved: ResolvedModel, key: str) -> Path:
    """Where the ONNX variants of the model with content hash `key` live."""
    if not os.environ.get("RETRIEVEKIT_CACHE", "").strip() and resolved.source == "path":
        model_dir = Path(resolved.load_from)
        if _beside_model_ok(model_dir):
            return model_dir / "onnx" / "retrievekit" / key
    return user_cache_dir() / "onnx" / key


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"ok": False, "reason": f"unreadable record {path}"}
    return record if isinstance(record, dict) else {"ok": False, "reason": "malformed record"}


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


@dataclass(frozen=True)
class Variant:
    """One ONNX model of a cache folder: kind "embed" or "rerank", precision "fp32" or "int8"."""

    kind: str
    precision: str

    @property
    def stem(self) -> str:
        return f"{self.kind}-{self.precision}"

    @property
    def tolerance(self) -> float:
        return TOLERANCE[(self.kind, self.precision)]


# -- export ------------------------------------------------------------------------------------
def _input_names(hf_tokenizer: Any) -> list[str]:
    names = list(getattr(hf_tokenizer, "model_input_names", None) or _INPUTS[:2])
    unknown = [n for n in names if n not in _INPUTS]
    if unknown or "input_ids" not in names or "attention_mask" not in names:
        raise OnnxUnavailable(f"tokenizer inputs {names} are not input_ids/attention_mask"
                              "[/token_type_ids]")
    return [n for n in _INPUTS if n in names]


def _graph(module: Any, forward: Callable[[Any, dict[str, Any]], Any]):
    """`module` (registered, so its weights become the graph's initializers) behind a forward
    that takes the tokenizer's tensors as named arguments."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            features = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                features["token_type_ids"] = token_type_ids
            return forward(self.inner, features)

    return Graph().eval()


def _export_graph(module: Any, forward: Callable[[Any, dict[str, Any]], Any], hf_tokenizer: Any,
                  path: Path, example_inputs: Sequence[Any]) -> None:
    """Export `forward(module, features) -> tensor`, batch and sequence axes dynamic."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as exc:
        raise MissingDependencyError(
            f"exporting to ONNX needs onnxscript: {_INSTALL}") from exc
    import torch

    names = _input_names(hf_tokenizer)
    enc = hf_tokenizer(*example_inputs, padding=True, truncation=True, return_tensors="pt")
    args = tuple(enc[n] for n in names)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {n: {0: batch, 1: seq} for n in names}
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.onnx")
    try:
        with torch.no_grad(), _quiet("torch.onnx", "onnxscript", "onnx_ir"):
            torch.onnx.export(_graph(module, forward), args, str(tmp), dynamo=True,
                              input_names=names, output_names=["retrievekit_output"],
                              dynamic_shapes=dynamic, external_data=False, verbose=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Mute the exporters' chatter (their INFO/WARNING notes and Python warnings about their
    own internals) for the duration of one export; errors still raise."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    root_filter = _DropQuantizationAdvice()
    logging.getLogger().addFilter(root_filter)
    try:
        for lg, _ in saved:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)
        logging.getLogger().removeFilter(root_filter)


class _DropQuantizationAdvice(logging.Filter):
    """onnxruntime's quantizer logs advice on the root logger ("consider pre-processing")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8: per-channel int8 weights on MatMul/Gemm only (embeddings stay fp32)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise MissingDependencyError(f"int8 quantization needs onnx: {_INSTALL}") from exc
    tmp = dst.with_name(f".{dst.stem}.{os.getpid()}.tmp.onnx")
    try:
        with _quiet("onnxruntime"):
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8,
                             per_channel=True, op_types_to_quantize=["MatMul", "Gemm"])
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


# -- the runtime -------------------------------------------------------------------------------
class _Session:
    """An onnxruntime session plus the model's fast tokenizer, batched by length."""

    def __init__(self, folder: Path, variant: Variant, record: dict[str, Any],
                 num_threads: int | None, max_length: int | None) -> None:
        ort = require_onnxruntime()
        from tokenizers import Tokenizer

        self.record = record
        self.path = folder / f"{variant.stem}.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = resolve_num_threads(num_threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle threads sleep instead of spinning: on a shared CPU (torch, Chroma, other
        # processes) spinning steals the cores that the next call needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options,
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok = record["tokenizer"]
        self.max_length = int(max_length or record["max_length"])
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length, strategy="longest_first",
                                         direction=tok.get("truncation_side", "right"))
        self.pad = (int(tok["pad_token_id"]), int(tok.get("pad_token_type_id", 0)))
        self.left_pad = tok.get("padding_side", "right") == "left"
        self.lower = bool(tok.get("do_lower_case", False))

    def _batch(self, encodings: Sequence[Any]) -> dict[str, np.ndarray]:
        width = max(len(e.ids) for e in encodings)
        n = len(encodings)
        ids = np.full((n, width), self.pad[0], dtype=np.int64)
        types = np.full((n, width), self.pad[1], dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, e in enumerate(encodings):
            k = len(e.ids)
            cols = slice(width - k, width) if self.left_pad else slice(0, k)
            ids[i, cols] = e.ids
            types[i, cols] = e.type_ids
            mask[i, cols] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: feeds[name] for name in self.input_names}

    def run(self, inputs: Sequence[Any], batch_size: int, progress: bool = False) -> np.ndarray:
        """Outputs for `inputs` (texts or (a, b) pairs) in input order, longest batched first."""
        if self.lower:
            inputs = [tuple(s.lower() for s in x) if isinstance(x, tuple) else x.lower()
                      for x in inputs]
        encodings = self.tokenizer.encode_batch(list(inputs))
        order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i].ids))
        out: np.ndarray | None = None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc="encode (onnx)", unit="text")
        try:
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                got = self.session.run(None, self._batch([encodings[i] for i in idx]))[0]
                if out is None:
                    out = np.empty((len(encodings),) + got.shape[1:], dtype=np.float32)
                out[idx] = got
                if bar is not None:
                    bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
        assert out is not None  # inputs is never empty here
        return out


class OnnxEmbedder(_Session):
    """Sentence embeddings from an exported sentence-transformers model (its own pooling and
    normalization included), float32 of shape (n, dim)."""

    @property
    def dim(self) -> int:
        return int(self.record["dim"])

    def encode(self, texts: Sequence[str], batch_size: int = 32,
               progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.run(list(texts), batch_size, progress)


class OnnxCrossEncoder(_Session):
    """Logits of an exported cross-encoder: shape (n,) for one label, else (n, labels)."""

    def predict(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> np.ndarray:
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        out = self.run([(str(a), str(b)) for a, b in pairs], batch_size)
        return out[:, 0] if out.ndim == 2 and out.shape[1] == 1 else out


# -- loading: cache, export, check -------------------------------------------------------------
def _tokenizer_record(hf_tokenizer: Any, do_lower_case: bool) -> dict[str, Any]:
    if not getattr(hf_tokenizer, "is_fast", False) or \
            getattr(hf_tokenizer, "backend_tokenizer", None) is None:
        raise OnnxUnavailable("the model has no fast tokenizer (tokenizer.json)")
    pad = hf_tokenizer.pad_token_id
    if pad is None:
        raise OnnxUnavailable("the tokenizer has no padding token")
    return {"pad_token_id": int(pad),
            "pad_token_type_id": int(getattr(hf_tokenizer, "pad_token_type_id", 0) or 0),
            "padding_side": getattr(hf_tokenizer, "padding_side", "right"),
            "truncation_side": getattr(hf_tokenizer, "truncation_side", "right"),
            "do_lower_case": bool(do_lower_case)}


def _save_tokenizer(hf_tokenizer: Any, folder: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    _write_atomic(folder / "tokenizer.json", tok.to_str().encode())


def _embed_deviation(got: np.ndarray, ref: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    ng, nr = np.linalg.norm(got, axis=1), np.linalg.norm(ref, axis=1)
    cos = (got * ref).sum(axis=1) / np.maximum(ng * nr, 1e-12)
    return float(max(np.max(1.0 - cos), np.max(np.abs(ng - nr) / np.maximum(nr, 1e-12))))


def _rerank_deviation(got: np.ndarray, ref: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref)))))


@dataclass
class _Spec:
    """What differs between the embedder's and the reranker's export and check."""

    variant: Variant
    label: str  # the model name, for messages
    reference: Callable[[], Any]  # loads the fp32 torch model on the CPU
    prefixes: tuple[str, ...] = ("",)
    max_length: int | None = None  # rerank: the configured max_length


class _Stages:
    """A progress bar over the stages of one export: shown on a terminal unless the caller
    says otherwise; each stage is also logged (INFO), for logs that are not a terminal."""

    def __init__(self, label: str, stages: int, progress: bool | None) -> None:
        from tqdm.auto import tqdm

        show = sys.stderr.isatty() if progress is None else progress
        self.label = label
        self.bar = tqdm(total=stages, desc=f"ONNX export of {label}", disable=not show,
                        bar_format="{desc}: {n}/{total} [{elapsed}] {postfix}")
        self.started = time.perf_counter()
        self.current: str | None = None
        self._done = threading.Event()
        if show:  # a stage lasts up to a minute: keep its clock moving
            threading.Thread(target=self._tick, daemon=True).start()

    def _tick(self) -> None:
        while not self._done.wait(1.0):
            self.bar.refresh()

    def start(self, stage: str) -> None:
        if self.current is not None:
            self.bar.update(1)
        self.current = stage
        self.bar.set_postfix_str(stage)
        logger.info("%s: %s (%.0f s into the export)", self.label, stage,
                    time.perf_counter() - self.started)

    def close(self) -> None:
        self._done.set()
        if self.current is not None:
            self.bar.update(1)
        self.bar.close()


_PROMPT_LEFT_OUT = "the model's pooling leaves prompt tokens out, which the exported " \
    "graph cannot see"


def _pools_prompt(model: Any) -> bool:
    """Whether a sentence-transformers model's pooling reads the prompt's tokens (the
    exported graph always does; `include_prompt=False` leaves them out)."""
    pooling = next((m for m in model if hasattr(m, "include_prompt")), None)
    return pooling is None or bool(pooling.include_prompt)


def _export_and_check(spec: _Spec, folder: Path, num_threads: int | None,
                      stages: _Stages) -> dict[str, Any]:
    """Export (fp32) or quantize (int8) the variant into `folder` and check it against torch.

    Returns its record (ok true or false); `_prepare` writes it."""
    variant = spec.variant
    path = folder / f"{variant.stem}.onnx"
    started = time.perf_counter()
    stages.start("loading the torch model")
    ref_model = spec.reference()
    if variant.kind == "embed":
        hf_tok = ref_model.tokenizer
        first = ref_model[0]
        if any(spec.prefixes) and not _pools_prompt(ref_model):
            raise OnnxUnavailable(_PROMPT_LEFT_OUT)
        tok = _tokenizer_record(hf_tok, getattr(first, "do_lower_case", False))
        dim_fn = getattr(ref_model, "get_embedding_dimension", None) or \
            ref_model.get_sentence_embedding_dimension
        record_extra = {"dim": int(dim_fn()), "max_length": int(ref_model.max_seq_length),
                        "include_prompt": _pools_prompt(ref_model)}
        module = ref_model

        def forward(m: Any, features: dict[str, Any]) -> Any:
            return m(features)["sentence_embedding"]

        example = (["a short text", "a somewhat longer example text for the export"],)
    else:
        hf_tok = ref_model.tokenizer
        tok = _tokenizer_record(hf_tok, False)
        module = ref_model.model  # the transformers sequence-classification model
        record_extra = {"max_length": int(ref_model.max_length),
                        "num_labels": int(module.config.num_labels)}

        def forward(m: Any, features: dict[str, Any]) -> Any:
            return m(**features).logits

        example = (["a short query", "a longer query for the export"],
                   ["a passage", "a somewhat longer passage for the export example"])

    if path.exists():
        pass  # a file without its record (a crash after the rename, a copy): check it only
    elif variant.precision == "fp32":
        stages.start("exporting the graph")
        _export_graph(module, forward, hf_tok, path, example)
    else:  # `load` made and checked the fp32 variant first
        stages.start("quantizing to int8")
        _quantize_int8(folder / f"{variant.kind}-fp32.onnx", path)
    _save_tokenizer(hf_tok, folder)
    record: dict[str, Any] = {
        "format": EXPORT_FORMAT, "kind": variant.kind, "precision": variant.precision,
        "model": spec.label, "tokenizer": tok, **record_extra, **_versions(),
        "sha256": _sha256(path), "tolerance": variant.tolerance,
    }
    stages.start("checking against torch")
    deviation = _check(spec, folder, record, ref_model, num_threads)
    record.update(deviation=deviation, ok=deviation <= variant.tolerance,
                  seconds=round(time.perf_counter() - started, 1))
    if not record["ok"]:
        record["reason"] = (f"probe deviation {deviation:.3g} exceeds the tolerance "
                            f"{variant.tolerance:g}")
    return record


def _check(spec: _Spec, folder: Path, record: dict[str, Any], ref_model: Any,
           num_threads: int | None) -> float:
    """Largest deviation of the ONNX variant from fp32 torch on the probe set."""
    import torch

    variant = spec.variant
    worst = 0.0
    if variant.kind == "embed":
        runner = OnnxEmbedder(folder, variant, record, num_threads, None)
        for prefix in dict.fromkeys(spec.prefixes):
            texts = list(EMBED_PROBES)
            ref = ref_model.encode(texts, prompt=prefix, batch_size=4,
                                   convert_to_numpy=True, normalize_embeddings=False,
                                   show_progress_bar=False)
            got = runner.encode([prefix + t for t in texts], batch_size=4)
            one = runner.encode([prefix + texts[1]], batch_size=1)  # unpadded path
            worst = max(worst, _embed_deviation(got, ref),
                        _embed_deviation(one, np.asarray(ref)[1:2]))
    else:
        runner = OnnxCrossEncoder(folder, variant, record, num_threads, spec.max_length)
        old = ref_model.max_length
        if spec.max_length is not None:
            ref_model.max_length = spec.max_length
        try:
            ref = ref_model.predict(list(RERANK_PROBES), batch_size=4, convert_to_numpy=True,
                                    activation_fn=torch.nn.Identity(), show_progress_bar=False)
        finally:
            ref_model.max_length = old
        got = runner.predict(list(RERANK_PROBES), batch_size=4)
        worst = _rerank_deviation(got, np.asarray(ref, dtype=np.float32))
    return worst


def _prepare(spec: _Spec, folder: Path, num_threads: int | None, *, export: bool = True,
             progress: bool | None = None) -> dict[str, Any]:
    """The record of `spec.variant` in `folder`, exporting and checking it first if needed.

    A model file without a record is checked, not exported again; one whose record is
    outdated (another export format, or a failure under another torch) is exported anew.

    Raises:
        NotExported: `export` is False and there is no current record."""
    from filelock import FileLock

    stem = spec.variant.stem
    record_path = folder / f"{stem}.json"
    record = _read_record(record_path)
    if record is not None and _current(record):
        return record
    if not export:
        raise NotExported(f"no ONNX export of {spec.label} ({stem}) in {folder} yet")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / ".lock"))
        lock.acquire()
    except OSError as exc:
        raise OnnxUnavailable(f"cannot write the ONNX cache {folder} ({exc}); set "
                              "RETRIEVEKIT_CACHE to a writable folder") from exc
    try:
        record = _read_record(record_path)  # another process may have finished meanwhile
        if record is not None and _current(record):
            return record
        if record is not None:
            (folder / f"{stem}.onnx").unlink(missing_ok=True)
        logger.info("exporting %s to ONNX (%s), once; cached in %s", spec.label, stem, folder)
        stages = _Stages(f"{spec.label} ({stem})", 3, progress)
        try:
            record = _export_and_check(spec, folder, num_threads, stages)
        except (OnnxUnavailable, MissingDependencyError):
            raise
        except Exception as exc:  # an exporter or runtime failure on this model
            record = {"format": EXPORT_FORMAT, "kind": spec.variant.kind,
                      "precision": spec.variant.precision, "model": spec.label, "ok": False,
                      "reason": f"export failed: {type(exc).__name__}: {str(exc)[:300]}",
                      **_versions()}
        finally:
            stages.close()
        if not record["ok"]:
            (folder / f"{stem}.onnx").unlink(missing_ok=True)
        _write_atomic(record_path, json.dumps(record, indent=1).encode())
        logger.info("%s (%s): export %s in %.0f s", spec.label, stem,
                    "checked" if record["ok"] else "refused", time.perf_counter() - stages.started)
        return record
    finally:
        lock.release()


def _current(record: dict[str, Any]) -> bool:
    """A record still holds: a success of this format, or a failure under the same torch."""
    if record.get("format") != EXPORT_FORMAT:
        return False
    if record.get("ok"):
        return True
    import torch

    return record.get("torch") == torch.__version__


def load(kind: str, resolved: ResolvedModel, label: str, *, reference: Callable[[], Any],
         quantize: str | None = None, num_threads: int | None = None,
         prefixes: Sequence[str] = ("",), max_length: int | None = None,
         export: bool = True, progress: bool | None = None
         ) -> OnnxEmbedder | OnnxCrossEncoder:
    """The ONNX engine of a model: from the cache, or exported, checked and cached now.

    Args:
        kind: "embed" (a sentence-transformers model) or "rerank" (a cross-encoder).
        reference: loads the fp32 torch model on the CPU (only called to export/check).
        prefixes: the resolved prefixes the embedder will prepend (all are probed).
        max_length: the reranker's configured tokens per pair (None: the model's).
        export: export (and check) now when no export is cached; False: raise NotExported.
        progress: the export's progress bar; None: on a terminal.

    Raises:
        MissingDependencyError: onnxruntime (or, to export, onnxscript/onnx) is missing.
        NotExported: `export` is False and no checked export is cached.
        OnnxUnavailable: the model cannot be served by ONNX; the message says why.
    """
    require_onnxruntime()
    key = content_key(resolved)
    if key is None:
        raise OnnxUnavailable(f"{label!r} has no local files to hash (a hub model that is not "
                              "downloaded); its export could not be named")
    folder = cache_dir_for(resolved, key)
    loaded: list[Any] = []

    def reference_once() -> Any:
        if not loaded:
            loaded.append(reference())
        return loaded[0]

    variant = Variant(kind, quantize or "fp32")
    how = {"export": export, "progress": progress}
    if variant.precision != "fp32":  # int8 is quantized from the checked fp32 export
        base = Variant(kind, "fp32")
        _require_ok(_prepare(_Spec(base, label, reference_once, tuple(prefixes), max_length),
                             folder, num_threads, **how), folder / f"{base.stem}.json")
    record = _prepare(_Spec(variant, label, reference_once, tuple(prefixes), max_length),
                      folder, num_threads, **how)
    _require_ok(record, folder / f"{variant.stem}.json")
    if kind == "embed" and any(prefixes):  # an export may be checked without prefixes
        pools = record.get("include_prompt")
        if pools is None:  # an export recorded before it was recorded
            pools = _pools_prompt(reference_once())
        if not pools:
            raise OnnxUnavailable(_PROMPT_LEFT_OUT)
    path = folder / f"{variant.stem}.onnx"
    try:
        intact = _sha256(path) == record.get("sha256")
    except OSError:
        intact = False
    if not intact:
        raise OnnxUnavailable(f"the cached {path} is missing or does not match its recorded "
                              f"hash (corrupt or changed); delete {folder} to export again")
    cls = OnnxEmbedder if kind == "embed" else OnnxCrossEncoder
    try:
        return cls(folder, variant, record, num_threads, max_length)
    except Exception as exc:  # a file onnxruntime cannot load
        raise OnnxUnavailable(f"onnxruntime cannot load {path} ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); delete {folder} to export again") from exc


def _require_ok(record: dict[str, Any], record_path: Path) -> None:
    if not record.get("ok"):
        raise OnnxUnavailable(f"its ONNX export was refused ({record.get('reason')}); delete "
                              f"{record_path} to try again")


def load_engine(kind: str, resolved: ResolvedModel, label: str, *, backend: str,
                reference: Callable[[], Any], quantize: str | None = None,
                num_threads: int | None = None, prefixes: Sequence[str] = ("",),
                max_length: int | None = None) -> OnnxEmbedder | OnnxCrossEncoder | None:
    """`load`, or None when torch must serve instead (the reason logged once per process).

    backend="onnx" exports on first use (the user asked for this engine) and a missing
    onnxruntime raises; backend="auto" only opens an export that is already cached (first
    use never waits for one; `ModelEngines.export_onnx` makes it), and without onnxruntime
    torch serves.

    Raises:
        MissingDependencyError: backend="onnx" without onnxruntime (or onnxscript to export).
    """
    try:
        return load(kind, resolved, label, reference=reference, quantize=quantize,
                    num_threads=num_threads, prefixes=prefixes, max_length=max_length,
                    export=backend == "onnx")
    except MissingDependencyError as exc:
        if backend == "onnx":
            raise
        logger.info("%s: the ONNX engine is not installed (%s); torch serves", label, exc)
    except NotExported as exc:
        warn_once(f"{kind}:{label}:not-exported", "%s (%s): %s; torch serves every call. "
                  "Export it once ahead of time with .export_onnx() on the embedder or "
                  "reranker to serve small calls with onnxruntime", label, kind, exc,
                  level=logging.INFO)
    except OnnxUnavailable as exc:
        warn_once(f"{kind}:{label}:{exc}", "%s (%s): ONNX engine refused, torch serves "
                  "instead: %s", label, kind, exc)
    return None
