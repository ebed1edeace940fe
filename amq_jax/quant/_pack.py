"""Bit-stream packing of integer weights and a single-file export of a quantized model.

``pack`` writes each value's low ``bits`` bits one after the other (little-endian bit order:
bit k of value i is stream bit ``i * bits + k``), so any width 1..16 costs exactly
``ceil(count * bits / 8)`` bytes.

File format of :func:`export_packed` (``.amq``; little-endian)::

    b"AMQJAX01"                 8 bytes   magic + format version
    header_len                  8 bytes   uint64
    header                      header_len bytes, UTF-8 JSON
    payload                     the tensors' bytes, back to back, no padding

The header lists every parameter with its path, shape, kind and byte offsets; a quantized
weight also records its layer name and its output-channel ``axis`` (files written before
the axis was recorded mean ``-1``). The payload holds, for each quantized weight (per
output channel on its own axis: ``-1`` for Linen/NNX ``[..., in, out]`` kernels, ``0`` for
Equinox ``[out, in, ...]`` weights): its packed integer levels, then ``C_out`` float32
scales, then (asymmetric only) ``C_out`` float32 zero-points; every other parameter as raw
float32. So ``file size == 16 + header_len + payload`` and the payload equals
``amq_jax.alloc.model_size_bytes(params, config, layers=layers)`` exactly.

The header's ``grid`` names the integer grid the levels are on ('amq' or 'qwix'; files
without it are 'amq'). Loading needs no grid: every weight comes back as
``(q - zero_point) * scale``, the values the model was fine-tuned with, whichever grid made
them. ``load_packed(..., grid=...)`` checks the file against the grid a caller expects
(e.g. integer levels to hand to qwix) and refuses a file of the other grid.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any

import jax
import numpy as np

from amq_jax import _io, _paths
from amq_jax.errors import LayerError, StateError
from amq_jax.quant._config import BitConfig
from amq_jax.quant._math import GRIDS, check_bits, quantize_jit

__all__ = ["pack", "unpack", "packed_nbytes", "export_packed", "load_packed", "read_header",
           "MAGIC"]

MAGIC = b"AMQJAX01"


def packed_nbytes(count: int, bits: int) -> int:
  """Bytes of ``count`` values packed at ``bits`` bits each: ``ceil(count * bits / 8)``."""
  return (int(count) * check_bits(bits) + 7) // 8


def pack(q, bits: int, *, signed: bool | None = None) -> np.ndarray:
  """Packs integers into a uint8 bit stream of ``packed_nbytes(q.size, bits)`` bytes.

  Args:
    q: integer array (any shape; flattened in C order).
    bits: 1..16.
    signed: two's complement range ``[-2^(b-1), 2^(b-1)-1]`` if True, ``[0, 2^b-1]`` if False;
      None infers it (signed iff any value is negative).

  Raises ValueError if a value does not fit.
  """
  bits = check_bits(bits)
  v = np.asarray(q).astype(np.int64).ravel()
  if signed is None:
    signed = bool(v.size and v.min() < 0)
  lo, hi = ((-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1))
  if v.size and (v.min() < lo or v.max() > hi):
    raise ValueError(f"values in [{v.min()}, {v.max()}] do not fit {bits} "
                     f"{'signed' if signed else 'unsigned'} bits [{lo}, {hi}]")
  u = (v & ((1 << bits) - 1)).astype(np.uint32)
  stream = ((u[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
  return np.packbits(stream.ravel(), bitorder="little")


def unpack(buf, bits: int, count: int, signed: bool) -> np.ndarray:
  """Inverse of :func:`pack`: the first ``count`` values as int32."""
  bits = check_bits(bits)
  buf = np.frombuffer(buf, np.uint8) if isinstance(buf, (bytes, bytearray, memoryview)) else (
      np.asarray(buf, np.uint8))
  if buf.size < packed_nbytes(count, bits):
    raise ValueError(f"buffer of {buf.size} bytes is too short for {count} x {bits} bits")
  stream = np.unpackbits(buf, count=count * bits, bitorder="little").reshape(count, bits)
  u = stream.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))
  if signed:
    u = np.where(u >= (1 << (bits - 1)), u - (1 << bits), u)
  return u.astype(np.int32)


def _kernel_levels(w, bits: int, symmetric: bool, scale_method: str, axis: int = -1,
                   grid: str = "amq"):
  qt = quantize_jit(w, bits=bits, symmetric=symmetric, axis=axis, scale_method=scale_method,
                    grid=grid)
  q = np.asarray(qt.q)
  if symmetric and bits == 1:
    q = (q > 0).astype(np.int32)  # binary: store the sign bit, +1 -> 1, -1 -> 0
    signed = False
  else:
    signed = symmetric or grid == "qwix"  # qwix's asymmetric levels are signed too
  return (q, signed, np.asarray(qt.scale, np.float32).ravel(),
          np.asarray(qt.zero_point, np.float32).ravel())


def export_packed(params, bits_cfg, path: str | os.PathLike, *, layers=None,
                  symmetric: bool = True, scale_method: str = "minmax",
                  grid: str = "amq") -> dict:
  """Writes ``params`` to one file with every configured layer's weight packed at its width.

  Weights in ``bits_cfg`` are quantized per output channel exactly as
  :func:`amq_jax.quant.quantize_params` does; all other leaves are stored as float32.

  Args:
    params: the params pytree (any structure: nested dicts, an Equinox module, ...).
    bits_cfg: a ``BitConfig`` or mapping ``{layer: {'w': bits, ...} | bits}``.
    path: output file (the ``.amq`` format of the module docstring).
    layers: the model's ``adapters.Layers`` (each layer's weight leaf and channel axis);
      without it, leaves named ``kernel`` with the output channel last.
    symmetric, scale_method, grid: as in :func:`amq_jax.quant.quantize`; the grid is
      recorded in the header.

  Returns:
    ``{'file_bytes', 'header_bytes', 'payload_bytes'}``.
  """
  from amq_jax.quant._apply import _check_grid_widths, check_config, quantizable_layers

  flat = _paths.flatten(params)
  if layers is None:
    cfg = check_config(bits_cfg, quantizable_layers(params))
    wanted = {l + "/kernel": (l, cfg[l]["w"], -1) for l in cfg.layers if cfg[l]["w"] is not None}
  else:
    cfg = check_config(bits_cfg, layers)
    wanted = {layers[l].param: (l, cfg[l]["w"], layers[l].channel_axis)
              for l in cfg.layers if cfg[l]["w"] is not None}
  _check_grid_widths([(l, "w", b) for l, b, _ in wanted.values()], grid, symmetric,
                     scale_method)
  entries, chunks, offset = [], [], 0

  def add(buf: bytes):
    nonlocal offset
    chunks.append(buf)
    start, offset = offset, offset + len(buf)
    return [start, len(buf)]

  for p, v in flat.items():
    v = np.asarray(jax.device_get(v))
    e: dict[str, Any] = {"path": p, "shape": list(v.shape), "dtype": str(v.dtype)}
    if p in wanted:
      layer, b, axis = wanted[p]
      q, signed, scale, zp = _kernel_levels(v, b, symmetric, scale_method, axis, grid)
      e.update(kind="quant", layer=layer, axis=int(axis), bits=b, signed=signed,
               symmetric=symmetric,
               levels=add(pack(q, b, signed=signed).tobytes()),
               scale=add(scale.tobytes()))
      if not symmetric:
        e["zero_point"] = add(zp.tobytes())
    else:
      e.update(kind="float32", data=add(np.ascontiguousarray(v, np.float32).tobytes()))
    entries.append(e)
  header = json.dumps({"format": MAGIC.decode(), "grid": grid, "entries": entries,
                       "payload_bytes": offset}, separators=(",", ":")).encode()
  # One atomic write: an interrupted export leaves the previous file (or none), never half.
  _io.write_bytes(path, b"".join([MAGIC, struct.pack("<Q", len(header)), header, *chunks]))
  head = len(MAGIC) + 8 + len(header)
  return {"file_bytes": head + offset, "header_bytes": head, "payload_bytes": offset}


def _damaged(path, why: str) -> StateError:
  return StateError(f"{os.fspath(path)} is damaged or not an amq-jax packed model ({why}); "
                    "delete it and re-run amq-jax finetune to export it again")


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
  """The JSON header of an ``.amq`` file and the byte offset where its payload starts.

  Raises:
    StateError: the file is not an ``.amq`` file or its header is damaged (names the file).
  """
  with open(path, "rb") as f:
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
      raise _damaged(path, f"magic {magic!r}, expected {MAGIC!r}")
    size = os.fstat(f.fileno()).st_size
    raw_n = f.read(8)
    if len(raw_n) != 8:
      raise _damaged(path, "the file ends inside the header length")
    (n,) = struct.unpack("<Q", raw_n)
    if n > size - len(MAGIC) - 8:
      raise _damaged(path, f"the header length {n} runs past the end of the file ({size} bytes)")
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise _damaged(path, f"the header is not valid JSON: {e}") from None
  if (not isinstance(header, dict) or not isinstance(header.get("entries"), list)
      or not isinstance(header.get("payload_bytes"), int)):
    raise _damaged(path, "the header lacks 'entries' or 'payload_bytes'")
  return header, len(MAGIC) + 8 + n


def load_packed(path: str | os.PathLike, *, return_config: bool = False, like=None,
                grid: str | None = None):
  """Reads an :func:`export_packed` file back: dequantized float32 params.

  Args:
    path: the ``.amq`` file.
    return_config: also return the ``BitConfig`` of the packed layers (weight bits).
    like: a params pytree of the model (e.g. an Equinox module's ``params``): the result
      takes its structure. Without it, nested dicts keyed by the path components.
    grid: None loads a file of either grid (the values are exact either way); 'amq' or
      'qwix' requires the file to be on that grid.

  Returns:
    ``params`` or ``(params, BitConfig)``.

  Raises:
    StateError: the file is damaged, or was exported on another grid than ``grid``.
  """
  if grid is not None and grid not in GRIDS:
    raise ValueError(f"grid must be None or one of {GRIDS}, got {grid!r}")
  header, start = read_header(path)
  have = header.get("grid", "amq")
  if grid is not None and have != grid:
    raise StateError(f"{os.fspath(path)} holds weights on the {have!r} grid, not {grid!r}; "
                     f"load it with grid={have!r} (or grid=None), or export it again with "
                     f"grid={grid!r} (amq-jax: --config.quant.grid={grid} re-runs the "
                     "fine-tune)")
  with open(path, "rb") as f:
    f.seek(start)
    payload = f.read()
  if len(payload) != header["payload_bytes"]:
    raise _damaged(path, f"the payload is {len(payload)} bytes, the header says "
                   f"{header['payload_bytes']}")

  def get(span, dtype=np.float32):
    return np.frombuffer(payload[span[0]:span[0] + span[1]], dtype)

  flat, bits = {}, {}
  for i, e in enumerate(header["entries"]):
    try:
      shape = tuple(e["shape"])
      if e["kind"] == "quant":
        n, b = int(np.prod(shape)), e["bits"]
        q = unpack(get(e["levels"], np.uint8), b, n, e["signed"]).reshape(shape)
        if e["symmetric"] and b == 1:
          q = 2 * q - 1
        # One scale per output channel, on the weight's own axis (-1 in files before 'axis').
        per_channel = [1] * len(shape)
        if per_channel:
          per_channel[int(e.get("axis", -1))] = -1
        scale = get(e["scale"]).reshape(per_channel)
        zp = (get(e["zero_point"]).reshape(per_channel) if "zero_point" in e
              else np.zeros_like(scale))
        flat[e["path"]] = ((q.astype(np.float32) - zp) * scale).astype(np.float32)
        bits[e.get("layer", _paths.layer_of(e["path"]))] = {"w": b, "a": None}
      else:
        flat[e["path"]] = get(e["data"]).reshape(shape).copy()
    except (KeyError, TypeError, ValueError, IndexError) as err:
      raise _damaged(path, f"header entry {i} is malformed ({type(err).__name__}: {err})") from None
  if like is None:
    params = _paths.unflatten(flat)
  else:
    want = _paths.flatten(like)
    if set(want) != set(flat):
      raise LayerError(f"{path} does not hold the parameters of this model: missing "
                       f"{sorted(set(want) - set(flat))[:5]}, extra "
                       f"{sorted(set(flat) - set(want))[:5]}; load it with the model it "
                       "was exported from")
    params = _paths.merge(like, flat)
  return (params, BitConfig(bits)) if return_config else params
