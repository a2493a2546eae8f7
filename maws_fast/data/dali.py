"""The NVIDIA DALI input pipeline: GPU JPEG decode behind the loaders' common interface.

Two DALI pipelines per loader, with a thin host step between them::

    reader pipeline (CPU)      fn.readers.webdataset / fn.readers.file, sharded by GLOBAL rank,
                               pad_last_batch=True, buffer shuffle, checkpointed reader state
        -> host step           container check of every sample (inspect_image: a bad file is
                               named, logged, counted and replaced -- see batching.py), tags,
                               crop boxes + flips from (seed, epoch, batch, rank)
        -> decode pipeline     fn.decoders.image_slice (device="mixed" on a GPU: nvJPEG, with
                               hw_decoder_load and the preallocation hints) -> fn.resize ->
                               [fine-tune: fn.flip -> RandAugment ops, see dali_randaug.py] ->
                               fn.crop_mirror_normalize -> torch tensor on the training device
                               [fine-tune: -> RandomErasing, as the PIL loader erases]

Why split: a DALI decoder that meets a broken file stops the pipeline without naming the file,
so the bytes are checked (by name) before they reach it, and a decode error that still happens
costs only a rebuild of the stateless decode pipeline, not the reader position. Crop boxes, and a
fine-tune's RandAugment choices, come from the host so augmentation is a pure function of (seed,
epoch, batch, rank), the same draws as the PIL reference loader's, and the only state to
checkpoint is the reader's (DALI checkpointing). RandomErasing runs on the delivered batch with
the PIL loader's code: timm's 'pixel' mode fills with per-pixel noise, which ``fn.erase`` (one
fill value) cannot, and DALI's noise would not be a function of the sample's seed.

On a machine without a GPU both pipelines run on CPU operators (``device_id=None``); that is how
CI tests them. One batch is decoded ahead of the one being trained on.
"""

from __future__ import annotations

import base64
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from maws_fast.config import DaliSettings  # defined once, as the config's data.dali section
from maws_fast.data.batching import (
    BadSamples, EvalTransform, FinetuneAugment, TrainAugment, augment_batch, batches_per_epoch, real_in_batch,
)
from maws_fast.data.dali_randaug import apply_rand_augment, plan_batch
from maws_fast.data.images import ImageInfo, decode_pil, inspect_image
from maws_fast.data.pil_loader import check_identity, check_loader_args, loader_identity, make_targets, verify_hint
from maws_fast.data.shards import parse_meta
from maws_fast.data.sources import Source
from maws_fast.errors import ConfigError, DataError
from maws_fast.seeds import Stream, mix_seed


def dali_unavailable() -> str | None:
    """Why DALI cannot be used here, or None when it can."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return (f"NVIDIA DALI is not installed ({e}); run `bash scripts/setup.sh --cuda` (it picks the DALI wheel "
                "for the driver), or pip install nvidia-dali-cuda130 (a CUDA 13 driver) / nvidia-dali-cuda120 (CUDA 12)")
    return None


@dataclass
class _Prepared:
    """One batch after the host step, ready for (or being) decoded."""

    position: tuple[int, int]  # (epoch, batch)
    encoded: list[np.ndarray]
    names: list[str]
    tags: list[list[int]]
    labels: list[int]
    infos: list[ImageInfo]
    captions: list[str | None]
    bad: list[tuple[str, str]]  # (name, reason), counted when the batch is handed out
    reader_state: bytes  # reader checkpoint after this batch was read
    randaug: tuple[list[np.ndarray], list[np.ndarray]] | None = None  # a fine-tune's op codes and parameters
    scheduled: bool = False


class DaliLoader:
    """Batches decoded by DALI; same interface and arguments as :class:`~maws_fast.data.pil_loader.PilLoader`.

    Args:
        source: what to read.
        batch_size: per-rank batch size.
        seed: base seed (reader shuffle, augmentation).
        mean: per-channel mean of [0, 1] pixels.
        std: per-channel std of [0, 1] pixels.
        transform: :class:`TrainAugment` (MAE / WSP, or a fine-tune's with RandAugment and
            RandomErasing) or :class:`EvalTransform`.
        targets: "none", "tags" (padded ids + uniform weights) or "label".
        rank: global rank (the reader shard).
        world: global world size.
        shuffle: buffer-shuffle the reader; False reads in source order (evaluation).
        channels: 3 (RGB) or 1 (grey).
        device: where batches are delivered; a CUDA device selects mixed (nvJPEG) decode.
        settings: :class:`DaliSettings`.
        max_bad: distinct bad files tolerated.
        max_tags: pad width of the tag ids (0 = longest in the batch).
        log: where bad-sample lines go.
    """

    def __init__(self, source: Source, batch_size: int, seed: int, mean: Sequence[float], std: Sequence[float],
                 transform: TrainAugment | EvalTransform, targets: str = "none", rank: int = 0, world: int = 1,
                 shuffle: bool = True, channels: int = 3, device: torch.device | str = "cpu",
                 settings: DaliSettings | None = None, max_bad: int = 0, max_tags: int = 0,
                 log: Callable[[str], None] = print):
        why = dali_unavailable()
        if why:
            raise ConfigError(f"data.loader=dali: {why}; or use data.loader=pil")
        check_loader_args(source, batch_size, rank, world, targets, channels, mean, std)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("data.loader=dali on cuda, but torch sees no CUDA device; use --run.device=cpu")
        self.source, self.batch_size, self.seed = source, int(batch_size), int(seed)
        self.transform, self.targets, self.rank, self.world = transform, targets, rank, world
        self.shuffle, self.channels, self.max_tags = shuffle, channels, max_tags
        self.settings = settings or DaliSettings()
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.bad = BadSamples(max_bad, log, verify_hint(source))
        self.extras = FinetuneAugment.for_transform(transform, self.mean)
        self.log = log
        self.position = (0, 0)  # (epoch, batch) of the next batch handed out
        self._reader = None
        self._decoder = None
        self._restore: bytes | None = None  # reader checkpoint to rebuild from
        self._last_state: bytes | None = None  # reader checkpoint after the last batch handed out
        self._pending: _Prepared | None = None
        self._producer: _ReaderThread | None = None
        if source.shards is None:
            # A folder lists images class by class; a buffer shuffle cannot mix that, so the
            # reader gets the files in one seeded permutation (shards are shuffled when written).
            perm = torch.randperm(len(source), generator=torch.Generator().manual_seed(mix_seed(self.seed, Stream.FOLDER_ORDER)))
            self._file_order = perm.tolist() if shuffle else list(range(len(source)))

    # --- the interface ---------------------------------------------------------------------------
    @property
    def num_batches(self) -> int:
        return batches_per_epoch(len(self.source), self.world, self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def state_dict(self) -> dict[str, Any]:
        """The reader state after the last batch handed out (JSON-able), for the trainer's checkpoint."""
        state = self._last_state if self._last_state is not None else self._restore
        e, b = self.position
        return {"kind": "dali", "epoch": e, "batch": b, "bad": self.bad.state_dict(), **loader_identity(self),
                "shuffle_buffer": self.settings.shuffle_buffer,
                "reader": base64.b64encode(state).decode() if state is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "dali":
            raise DataError(f"the checkpoint's data state was written by the {state.get('kind')!r} loader; resume with "
                            f"--data.loader={state.get('kind')} or start a new run directory")
        check_identity(state, self)
        if state.get("shuffle_buffer") != self.settings.shuffle_buffer:
            raise DataError(f"the checkpoint's DALI reader used data.dali.shuffle_buffer={state.get('shuffle_buffer')}, "
                            f"now {self.settings.shuffle_buffer}: the sample order would change; resume with the same value")
        self.close()
        self.bad.load_state_dict(state.get("bad", {}))
        self.position = (int(state["epoch"]), int(state["batch"]))
        self._restore = base64.b64decode(state["reader"]) if state.get("reader") else None
        self._last_state = self._restore

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, Any]]:
        """Yields ``(images, targets)`` of one epoch from ``start_batch`` on (see PilLoader.epoch)."""
        if not 0 <= start_batch <= self.num_batches:
            raise DataError(f"start_batch {start_batch} is outside 0..{self.num_batches}; resume with the same data, "
                            "batch size and world size")
        if start_batch == self.num_batches:
            return
        self._seek((epoch, start_batch))
        nb = self.num_batches
        finished = False
        try:
            for b in range(start_batch, nb):
                cur = self._pending or self._take()
                self._pending = None
                if not cur.scheduled:
                    self._schedule(cur)
                imgs = self._collect(cur)
                if self.extras is not None:
                    imgs = self.extras.tensors(imgs, self.seed, epoch, b, self.rank)
                # Look one batch ahead (it may be the next epoch's first): its decode runs while
                # the training step on this one does.
                self._pending = self._take()
                self._schedule(self._pending)
                for name, why in cur.bad:
                    self.bad.add(name, why)
                self._last_state = cur.reader_state
                self.position = (epoch, b + 1) if b + 1 < nb else (epoch + 1, 0)
                keep = len(cur.names) if self.shuffle else real_in_batch(len(self.source), self.rank, self.world,
                                                                          self.batch_size, b)
                yield imgs[:keep], make_targets(self.targets, cur.tags[:keep], torch.tensor(cur.labels[:keep]),
                                                self.max_tags, cur.captions[:keep], cur.names[:keep])
            finished = True
        finally:
            if not finished:
                # Abandoned (a checkpoint-and-stop, an error, the end of training): the reader
                # thread has read ahead, so a later epoch() rebuilds it where the consumer is.
                self.close()
                self._restore = self._last_state

    def close(self) -> None:
        """Stops the reader thread and drops both pipelines (a later epoch() rebuilds them)."""
        if self._producer is not None:
            self._producer.stop()
            self._producer = None
        _shutdown(self._reader)
        _shutdown(self._decoder)
        self._reader, self._pending, self._decoder = None, None, None

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass

    def _take(self) -> _Prepared:
        """The next batch from the reader thread (re-raising what stopped it)."""
        item = self._producer.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    # --- reader side -------------------------------------------------------------------------------
    def _seek(self, where: tuple[int, int]) -> None:
        if self._reader is None:
            self._reader = self._build_reader(self._restore)
            self._restore = None
            if self.position == (0, 0) and where != (0, 0) and self._last_state is None:
                # No saved reader state (e.g. a checkpoint from the PIL loader): replay the reader.
                self.log(f"[data] no DALI reader state to resume from; replaying the reader to epoch {where[0]} "
                         f"batch {where[1]}")
                for _ in range(where[0] * self.num_batches + where[1]):
                    self._reader.run()
                self.position = where
            self._producer = _ReaderThread(self, self.position, depth=self.settings.prefetch)
        if self.position != where:
            raise DataError(f"the DALI loader is at epoch {self.position[0]} batch {self.position[1]} but epoch "
                            f"{where[0]} batch {where[1]} was asked for; resume from the checkpoint's data state")

    def _build_reader(self, checkpoint: bytes | None):
        from nvidia.dali import fn, pipeline_def

        # The definition captures locals only, never self: a pipeline that referenced its loader
        # would form a cycle, freed by the cyclic GC at some later moment -- possibly inside a
        # forked DataLoader worker, where tearing down DALI's threads crashes.
        st, src = self.settings, self.source
        order = None if src.shards is not None else list(self._file_order)
        common = dict(shard_id=self.rank, num_shards=self.world, pad_last_batch=True, random_shuffle=self.shuffle,
                      initial_fill=st.shuffle_buffer, stick_to_shard=not self.shuffle, name="reader")

        @pipeline_def(batch_size=self.batch_size, num_threads=st.threads, device_id=None,
                      seed=mix_seed(self.seed, Stream.DALI_PIPELINE) & 0x7FFFFFFF, enable_checkpointing=True,
                      prefetch_queue_depth=st.prefetch)
        def reader():
            if src.shards is not None:
                return *fn.readers.webdataset(paths=src.shards.tars, index_paths=src.shards.indexes, ext=["jpg", "json"],
                                             missing_component_behavior="error", **common),
            return *fn.readers.file(files=[src.paths[i] for i in order], labels=order, **common),

        pipe = reader(checkpoint=checkpoint) if checkpoint is not None else reader()
        try:
            pipe.build()
        except RuntimeError as e:
            raise DataError(f"DALI could not open the {src.kind} data: {_first_line(e)}") from None
        meta = pipe.reader_meta("reader")
        padded = meta["epoch_size_padded"] // self.world
        if -(-padded // self.batch_size) != self.num_batches:  # our sharding arithmetic must be DALI's
            raise RuntimeError(f"DALI pads a shard to {padded} samples, not {self.num_batches} batches of "
                               f"{self.batch_size}: {meta}")
        return pipe

    def _read(self, position: tuple[int, int]) -> _Prepared:
        """Reads the next reader batch (the one at ``position``) and runs the host step."""
        try:
            enc_tl, meta_tl = self._reader.run()
        except RuntimeError as e:
            raise DataError(f"DALI's reader failed on the {self.source.kind} data: {_first_line(e)}; "
                            f"check it with `{self.bad.fix_hint}`") from None
        state = self._reader.checkpoint()
        encoded, names, tags, labels, captions = [], [], [], [], []
        for i in range(len(enc_tl)):
            encoded.append(np.array(enc_tl[i]))  # a copy: DALI reuses its buffers
            if self.source.shards is not None:
                tar, _, member = enc_tl[i].source_info().rsplit(":", 2)
                names.append(f"{tar}:{member.rsplit('.', 1)[0]}")
                meta = parse_meta(np.array(meta_tl[i]).tobytes(), names[-1])
                tags.append(list(meta.get("tags", [])))
                labels.append(int(meta.get("label", -1)))
                captions.append(meta.get("caption"))
            else:
                k = int(np.array(meta_tl[i]).reshape(-1)[0])
                names.append(self.source.names[k])
                tags.append(list(self.source.tags[k]) if self.source.tags is not None else [])
                labels.append(self.source.labels[k] if self.source.labels is not None else -1)
                captions.append(self.source.captions[k] if self.source.captions is not None else None)
        infos = [inspect_image(x) for x in encoded]
        bad_slots = [not i.ok for i in infos]
        bad = [(names[i], infos[i].problem) for i in range(len(infos)) if bad_slots[i]]
        prep = _Prepared(position, encoded, names, tags, labels, infos, captions, bad, state)
        if self.extras is not None and self.extras.randaug is not None:
            # A function of the slot and the position only (not of the sample): a replaced bad
            # sample keeps its slot's draws, as in the PIL loader.
            prep.randaug = plan_batch(self.extras.randaug, len(encoded), self.transform.out_size, self.seed,
                                      position[0], position[1], self.rank)
        if bad:
            _replace(prep, self.bad.substitute(bad_slots))
        return prep

    # --- decode side -------------------------------------------------------------------------------
    def _build_decoder(self):
        from nvidia.dali import fn, pipeline_def, types

        st, t = self.settings, self.transform
        gpu = self.device.type == "cuda"
        # adjust_orientation=False: the crop boxes come from the stored (unrotated) size, as PIL
        # decodes it; DALI would otherwise rotate EXIF-tagged phone photos under the box.
        dec = dict(device="mixed" if gpu else "cpu", output_type=types.RGB if self.channels == 3 else types.GRAY,
                   adjust_orientation=False)
        if gpu:
            dec.update(hw_decoder_load=st.hw_decoder_load, device_memory_padding=st.device_memory_padding,
                       host_memory_padding=st.host_memory_padding, preallocate_width_hint=st.preallocate_width_hint,
                       preallocate_height_hint=st.preallocate_height_hint)
        scale = 255.0 if st.output == "float32" else 1.0
        norm = dict(dtype=types.FLOAT if st.output == "float32" else types.UINT8, output_layout="CHW",
                    mean=[m * scale for m in self.mean] if st.output == "float32" else [0.0] * self.channels,
                    std=[s * scale for s in self.std] if st.output == "float32" else [1.0] * self.channels)
        dev_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        randaug = self.extras.randaug if self.extras is not None else None
        fill = randaug.fill_for(self.channels) if randaug is not None else ()
        channels = self.channels

        @pipeline_def(batch_size=self.batch_size, num_threads=st.threads, device_id=dev_id, prefetch_queue_depth=1,
                      enable_conditionals=randaug is not None)
        def decoder():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            if isinstance(t, TrainAugment):
                anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)  # (x, y) = (left, top)
                shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)  # (w, h)
                flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
                x = fn.decoders.image_slice(enc, anchor, shape, normalized_anchor=False, normalized_shape=False,
                                            axis_names="WH", **dec)
                x = fn.resize(x, size=[t.out_size, t.out_size], interp_type=types.INTERP_LINEAR, antialias=True)
                if randaug is None:
                    return fn.crop_mirror_normalize(x, mirror=flip, **norm)
                # timm's order: crop, flip, RandAugment (the ops are not flip-symmetric).
                codes = fn.external_source(name="ra_code", dtype=types.INT32, ndim=1)
                params = fn.external_source(name="ra_param", dtype=types.FLOAT, ndim=2)
                x = fn.flip(x, horizontal=flip)
                x = apply_rand_augment(x, codes, params, randaug.num_ops, fill, t.out_size, channels, gpu)
                return fn.crop_mirror_normalize(x, **norm)
            x = fn.decoders.image(enc, **dec)
            x = fn.resize(x, resize_shorter=t.resize_shorter, interp_type=types.INTERP_LINEAR, antialias=True)
            return fn.crop_mirror_normalize(x, crop=[t.out_size, t.out_size], **norm)

        pipe = decoder()
        pipe.build()
        return pipe

    def _schedule(self, p: _Prepared) -> None:
        if self._decoder is None:
            self._decoder = self._build_decoder()
        self._feed(p)
        self._decoder.schedule_run()
        p.scheduled = True

    def _feed(self, p: _Prepared) -> None:
        self._decoder.feed_input("enc", p.encoded)
        if isinstance(self.transform, TrainAugment):
            boxes, flips = augment_batch(p.infos, self.seed, p.position[0], p.position[1], self.rank, self.transform)
            b = boxes.to(torch.int32).numpy()  # (B, 4): top, left, h, w
            self._decoder.feed_input("anchor", list(np.ascontiguousarray(b[:, [1, 0]])))
            self._decoder.feed_input("shape", list(np.ascontiguousarray(b[:, [3, 2]])))
            self._decoder.feed_input("flip", list(flips.to(torch.int32).numpy()))
            if p.randaug is not None:
                self._decoder.feed_input("ra_code", p.randaug[0])
                self._decoder.feed_input("ra_param", p.randaug[1])

    def _collect(self, p: _Prepared) -> torch.Tensor:
        """The decoded batch as a normalised float32 (B, C, S, S) tensor on the training device."""
        try:
            (out,) = self._decoder.outputs()
        except RuntimeError as e:
            out = self._recover(p, e)
        return self._to_torch(out)

    def _recover(self, p: _Prepared, err: Exception):
        """A sample passed the container check but failed to decode: find it, replace it, retry."""
        _shutdown(self._decoder)  # a failed DALI pipeline is no longer valid
        self._decoder = None
        failed = []
        for i, x in enumerate(p.encoded):
            try:
                decode_pil(x)
            except ValueError as e:
                failed.append((i, str(e)))
        if not failed:
            raise DataError(f"DALI could not decode a batch that PIL decodes completely ({_first_line(err)}); its "
                            f"files include {p.names[:4]}") from None
        slots = [False] * len(p.encoded)
        for i, why in failed:
            slots[i] = True
            p.bad.append((p.names[i], why))
        _replace(p, self.bad.substitute(slots))
        self._decoder = self._build_decoder()
        self._feed(p)
        self._decoder.schedule_run()
        (out,) = self._decoder.outputs()
        return out

    def _to_torch(self, out) -> torch.Tensor:
        t = out.as_tensor()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dtype = torch.float32 if self.settings.output == "float32" else torch.uint8
            x = torch.empty(t.shape(), dtype=dtype, device=self.device)
            feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            x = torch.from_numpy(np.array(t))  # a copy: the pipeline reuses its output buffer
        if self.settings.output == "uint8":
            mean = torch.tensor(self.mean, device=x.device).mul_(255).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device).mul_(255).view(1, -1, 1, 1)
            x = (x.float() - mean) / std
        return x


class _ReaderThread:
    """Runs the reader pipeline and the host step ahead of the consumer, on its own thread.

    The host step (copying the encoded bytes out of DALI's buffers, the container check, the
    JSON tags) costs ~10 ms per batch of 256 in Python; on the training thread that would come
    out of the step time. Batches come out in reader order; an exception is handed over in the
    queue and re-raised by the consumer.
    """

    def __init__(self, loader: DaliLoader, start: tuple[int, int], depth: int):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._halt = threading.Event()
        # A weak reference: a loader nobody holds any more is collected, and its thread ends.
        self._loader = weakref.ref(loader)
        self._thread = threading.Thread(target=self._run, args=(start, loader.num_batches), name="maws-dali-reader",
                                        daemon=True)
        self._thread.start()

    def _run(self, pos: tuple[int, int], nb: int) -> None:
        try:
            while not self._halt.is_set():
                loader = self._loader()
                if loader is None:
                    return
                item = loader._read(pos)
                del loader
                pos = _next(pos, nb)
                self._put(item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(e)

    def _put(self, item) -> None:
        while not self._halt.is_set() and self._loader() is not None:
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self):
        return self._q.get()

    def stop(self) -> None:
        self._halt.set()
        if threading.current_thread() is not self._thread:  # __del__ may run on the thread itself
            self._thread.join(timeout=30)


def _shutdown(pipe) -> None:
    """Shuts a DALI pipeline's native side (threads, buffers) down now.

    A DALI Pipeline sits in reference cycles, so the cyclic GC would free it at some later
    moment -- possibly inside a forked DataLoader worker, which then hangs or crashes joining
    threads that only exist in the parent.
    """
    shutdown = getattr(pipe, "_shutdown", None)  # Pipeline's own teardown (what its __del__ calls)
    if shutdown is not None:
        shutdown()


def _replace(p: _Prepared, slots: list[int]) -> None:
    """Slot i takes the sample of slot ``slots[i]`` (bad ones get a good one of the same batch)."""
    for field in ("encoded", "names", "tags", "labels", "infos", "captions"):
        vals = getattr(p, field)
        setattr(p, field, [vals[j] for j in slots])


def _next(pos: tuple[int, int], nb: int) -> tuple[int, int]:
    e, b = pos
    return (e, b + 1) if b + 1 < nb else (e + 1, 0)


def _first_line(e: Exception) -> str:
    """DALI's cause: the first line after "encountered:" (DALI prints our pipeline code above it)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("encountered") and i + 1 < len(lines):
            return lines[i + 1][:300]
    return (lines or [type(e).__name__])[-1][:300]
