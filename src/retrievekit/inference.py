"""Inference settings shared by the embedder and the reranker: engine, precision, threads.

- backend: "torch" (sentence-transformers), "onnx" (onnxruntime, see `onnx_backend`), or
  "auto": ONNX fp32 for small calls (a query, a few rerank pairs) where it is several times
  faster than torch, and torch in the resolved `dtype` for bulk calls when that dtype is a
  native half precision of the hardware (bf16 on CPUs with AVX512-BF16/AMX, fp16 on CUDA);
  on a CPU without native bf16 the fp32 ONNX engine serves every call. "auto" never exports:
  until a checked export is cached (`ModelEngines.export_onnx`, once per model), torch serves
  every call; backend="onnx" exports on first use, with a progress bar.
- dtype: "auto" resolves to bf16 on CPUs that have native bf16 instructions, fp16 on CUDA,
  else fp32. It applies to the torch engine; the ONNX engine runs fp32 (or int8, opt-in).
- num_threads: intra-op threads of both engines; the default never oversubscribes (see
  `default_num_threads`). torch's process-wide setting is touched when a model is loaded,
  never at import.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import validate as v
from .errors import ConfigError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = (None, "int8")
#: Upper bound of the default thread count: MiniLM-sized models gain little past 4 threads
#: while every extra thread competes with the rest of the process (Chroma, BM25, the app).
MAX_DEFAULT_THREADS = 4


def validate_inference(where: str, *, dtype: Any, backend: Any, onnx_quantize: Any,
                       num_threads: Any, device: str | None) -> str | None:
    """Check the inference settings of a config; returns `onnx_quantize` normalized.

    `onnx_quantize` accepts None/False (off), "int8", and True as a synonym of "int8".

    Raises:
        ConfigError: naming the setting, the value and the valid ones.
    """
    v.choice(f"{where}dtype", dtype, DTYPES)
    v.choice(f"{where}backend", backend, BACKENDS)
    v.text(f"{where}device", device, optional=True, empty=False,
           fix="e.g. 'cpu' or 'cuda:0'; None picks CUDA when present")
    quantize = {False: None, True: "int8"}.get(onnx_quantize, onnx_quantize) \
        if isinstance(onnx_quantize, bool) else onnx_quantize
    v.choice(f"{where}onnx_quantize", quantize, QUANTIZE, fix="True means 'int8'")
    if quantize is not None and backend == "torch":
        raise ConfigError(f"{where}onnx_quantize={quantize!r} quantizes the ONNX engine, but "
                          f"backend='torch'; set backend='onnx' (or 'auto'), or drop onnx_quantize")
    if backend == "onnx" and device is not None and not str(device).startswith("cpu"):
        raise ConfigError(f"{where}backend='onnx' runs on the CPU (onnxruntime's CPU provider), "
                          f"got device={device!r}; use backend='torch' (or 'auto') there")
    v.integer(f"{where}num_threads", num_threads, optional=True, fix="None: automatic")
    return quantize


# -- precision ---------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16 or AMX-BF16).

    Without those instructions torch emulates bf16 on CPU, which is slower than fp32.
    Read from /proc/cpuinfo; other systems report False (fp32 is the safe choice there).
    """
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def uses_cuda(device: str | None) -> bool:
    """Whether `device` (None: automatic) means a CUDA device."""
    if device is not None:
        return str(device).startswith("cuda")
    import torch

    return bool(torch.cuda.is_available())


def resolve_dtype(name: str, device: str | None) -> str:
    """The concrete dtype ("float32", "bfloat16", "float16") that `name` means on `device`."""
    if name != "auto":
        return name
    if uses_cuda(device):
        return "float16"
    if (device is None or str(device).startswith("cpu")) and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def torch_dtype(name: str):
    """The torch dtype of a concrete dtype name (None for float32, torch's default)."""
    import torch

    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


#: In backend="auto", calls of at most this many texts (or pairs) go to the fp32 ONNX engine
#: while bigger ones go to torch in a native half precision; see docs/benchmarks.md.
AUTO_ONNX_MAX_ITEMS = 8


def choose_engine(backend: str, dtype: str, quantize: str | None, device: str | None,
                  n_items: int) -> str:
    """Which engine ("onnx" or "torch") serves a call of `n_items` texts or pairs.

    Args:
        dtype: the resolved torch dtype ("float32", "bfloat16", "float16").
    """
    if backend != "auto":
        return backend
    if uses_cuda(device) or (device is not None and not str(device).startswith("cpu")):
        return "torch"
    if quantize is not None or dtype == "float32":
        return "onnx"
    return "onnx" if n_items <= AUTO_ONNX_MAX_ITEMS else "torch"


# -- threads -----------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        f = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(f.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def _env_threads() -> int | None:
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    try:
        n = int(raw)
    except ValueError:
        return None
    return n if n >= 1 else None


def default_num_threads() -> int:
    """Intra-op threads when none are configured.

    OMP_NUM_THREADS when set; else min(physical cores, 4), and never more than torch's
    current setting, so a process that lowered torch's threads keeps them lowered.
    """
    env = _env_threads()
    if env is not None:
        return env
    n = min(physical_cores(), MAX_DEFAULT_THREADS)
    torch = sys.modules.get("torch")
    if torch is not None:
        n = min(n, torch.get_num_threads())
    return max(1, n)


def resolve_num_threads(num_threads: int | None) -> int:
    """The configured thread count, or the default."""
    return num_threads if num_threads is not None else default_num_threads()


def configure_torch_threads(num_threads: int | None) -> None:
    """Apply the thread setting to torch, when a model is loaded (never at import).

    Explicit `num_threads` is applied as given (torch's setting is process-wide). Without
    it, torch is left alone when OMP_NUM_THREADS is set or when the process already chose
    a count other than torch's default (one per physical core); only an untouched default
    above `MAX_DEFAULT_THREADS` is lowered to it.
    """
    import torch

    current = torch.get_num_threads()
    if num_threads is not None:
        target = num_threads
    elif _env_threads() is not None or current != physical_cores():
        return
    else:
        target = min(current, MAX_DEFAULT_THREADS)
    if target != current:
        logger.info("torch intra-op threads: %d -> %d", current, target)
        torch.set_num_threads(target)


class ModelEngines:
    """The engines behind one model, shared by `Embedder` and `Reranker`.

    - `model`: the torch model, in `config.dtype` when that names a precision, in float32
      when it is "auto" (the full-precision model: to train, or to compare with);
    - the torch engine: torch in `dtype` (the resolved precision); `model` itself unless
      "auto" resolved to a half precision, then a second, internal copy;
    - the ONNX engine (`retrievekit.onnx_backend`): loaded from the export cache; exported
      on first use only with backend="onnx", else by `export_onnx()`.

    Subclasses set `config` and `resolved`, call `_init_engines()`, and provide
    `_load(device=None, dtype=None)` (a torch model), `_ONNX_KIND`, and optionally
    `_onnx_options()` / `_onnx_loaded(engine)` / `_reference_model()`.
    """

    _ONNX_KIND = ""
    config: Any
    resolved: Any

    def _init_engines(self) -> None:
        self._model = None  # `model`
        self._engine_model = None  # the torch engine, when it is not `model`
        self._lock = threading.Lock()
        self._onnx: Any = None  # the ONNX engine; False once refused (torch serves)
        self._onnx_lock = threading.Lock()
        self._dtype: str | None = None

    def _load(self, device: str | None = None, dtype: str | None = None) -> Any:
        raise NotImplementedError

    @property
    def dtype(self) -> str:
        """The torch engine's precision: `config.dtype` resolved for this machine."""
        if self._dtype is None:
            self._dtype = resolve_dtype(self.config.dtype, self.config.device)
        return self._dtype

    @property
    def _model_dtype(self) -> str:
        return "float32" if self.config.dtype == "auto" else self.dtype

    @property
    def model(self) -> Any:
        """The torch model (loaded on first access): in `config.dtype` when that names a
        precision, in float32 when it is "auto"; the half-precision copy that "auto" may
        pick for bulk calls is internal."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load(dtype=self._model_dtype)
        return self._model

    def _torch_engine(self) -> Any:
        """The torch model that serves torch calls, in `dtype`."""
        if self._model_dtype == self.dtype:
            return self.model
        if self._engine_model is None:
            with self._lock:
                if self._engine_model is None:
                    self._engine_model = self._load()
        return self._engine_model

    def _loaded_torch(self) -> Any:
        return self._model if self._model is not None else self._engine_model

    def engine_for(self, n_items: int) -> str:
        """The engine ("onnx" or "torch") that serves a call of `n_items` texts or pairs.

        Loads the ONNX engine when the settings pick it (backend="onnx": exporting it on
        first use), so that a refused or (backend="auto") missing export answers "torch"."""
        cfg = self.config
        if choose_engine(cfg.backend, self.dtype, cfg.onnx_quantize, cfg.device,
                         n_items) == "onnx" and self._onnx_engine() is not None:
            return "onnx"
        return "torch"

    def _reference_model(self) -> Any:
        """The fp32 CPU torch model an ONNX export is checked against: `model` when it is
        one, else a copy dropped after the check."""
        m = self._model
        if m is not None and self._model_dtype == "float32" and str(m.device) == "cpu":
            return m
        return self._load(device="cpu", dtype="float32")

    def _onnx_options(self) -> dict[str, Any]:
        return {}

    def _onnx_loaded(self, engine: Any) -> None:
        """Hook: check a freshly loaded ONNX engine against the settings."""

    def _onnx_engine(self) -> Any:
        """The ONNX engine, loaded on first use; None when refused (torch serves instead)."""
        if self._onnx is None:
            with self._onnx_lock:
                if self._onnx is None:
                    from .onnx_backend import load_engine

                    cfg = self.config
                    engine = load_engine(
                        self._ONNX_KIND, self.resolved, cfg.model, backend=cfg.backend,
                        reference=self._reference_model, quantize=cfg.onnx_quantize,
                        num_threads=cfg.num_threads, **self._onnx_options())
                    if engine is not None:
                        self._onnx_loaded(engine)
                    self._onnx = engine if engine is not None else False
        return self._onnx or None

    def export_onnx(self, *, progress: bool | None = None) -> Path:
        """Export this model to ONNX now (once per model and precision; a cached export is
        reused), check it against torch, and serve with it from now on where the settings
        pick the ONNX engine. backend="auto" needs this step (or another process's) to run
        small calls on onnxruntime; it never exports by itself.

        Args:
            progress: a progress bar of the export's stages; None: on a terminal.

        Returns:
            The exported `.onnx` file (in the export cache, see `retrievekit.onnx_backend`).

        Raises:
            MissingDependencyError: onnxruntime, onnxscript or onnx is missing.
            OnnxUnavailable: the export was refused (the message says why and how to retry).
        """
        from .onnx_backend import load

        cfg = self.config
        with self._onnx_lock:
            engine = load(self._ONNX_KIND, self.resolved, cfg.model,
                          reference=self._reference_model, quantize=cfg.onnx_quantize,
                          num_threads=cfg.num_threads, export=True, progress=progress,
                          **self._onnx_options())
            self._onnx_loaded(engine)
            self._onnx = engine
        return engine.path
