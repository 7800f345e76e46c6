"""Typed run configs: pydantic v2 models with ``extra="forbid"``, YAML I/O, dotted overrides.

One YAML file describes a run (sections ``model``, ``data``, ``train``, ``eval``; later
sections are added the same way). Every field has a description: ``scripts/gen_config_docs.py``
renders them into the README's config reference.

Errors: :func:`load_config` / :func:`parse_config` raise :class:`ConfigError` whose message
lists one line per problem, ``<field path>: <reason>`` (``model.layers[3].n_heads: must
divide d_model=96``).
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, SerializeAsAny, ValidationError,
                      field_validator, model_validator)

from seqlm import registry
from seqlm.blocks.base import BlockConfig


class ConfigError(ValueError):
    """A config (file, dict or override) is invalid; the message names each field."""


MAX_LAYERS = 4096  # a bound that keeps a typo (n_layers: 1e20) from expanding a pattern forever


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


# --------------------------------------------------------------------------------------
# layer specs: each entry is validated against the Config of the block its ``type`` names,
# looked up in the registry when the config is validated (not when this module is imported),
# so blocks registered later (entry points, ``@register`` in a user's script) work too
def _layer_spec(value: Any) -> Any:
    if isinstance(value, BlockConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping with a `type`, got {type(value).__name__}")
    kind = value.get("type")
    blocks = registry.blocks()
    if kind not in blocks:
        raise ValueError(f"type: unknown block type {kind!r}; registered: {sorted(blocks)}")
    try:
        return blocks[kind].Config.model_validate(value)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(x) for x in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}" if loc else msg)
        raise ValueError("; ".join(lines)) from None


LayerSpec = Annotated[SerializeAsAny[BlockConfig], BeforeValidator(_layer_spec)]


def _char_table() -> str:
    return ", ".join(f"'{c}'={n}" for c, n in sorted(registry.pattern_chars().items()))


class RecursiveConfig(Section):
    """Relaxed recursive sharing (Bae et al.): K unique blocks looped over the depth, per-depth LoRA."""

    groups: int = Field(
        ..., gt=0, description="K unique blocks; layer l runs block l mod K (a cycle), so layers l and "
        "l mod K must have identical specs. Shared: every nn.Linear weight of the block. Per depth: the "
        "pre-norm, the LoRA adapters and the block's small non-Linear parameters (biases, conv weights, "
        "A_log, D, dt bias, inner norms), which keeps SVD conversion exact (seqlm/recursive.py).",
    )
    lora_rank: int = Field(
        0, ge=0, description="Rank r of each depth's LoRA on every shared Linear: W'x + (alpha/r) B_l A_l x "
        "(capped at min(in, out) per Linear). 0: pure tying, one weight tensor per shared Linear.",
    )
    lora_alpha: Optional[float] = Field(
        None, gt=0, description="LoRA scale numerator (scale = alpha / r); null = r (scale 1).",
    )
    init: Literal["average", "first"] = Field(
        "average", description="How `seqlm convert recursive` set the shared weights from the tied layers "
        "(their average, or the first of them; the LoRA then holds the truncated SVD of each layer's "
        "residual W_l - W'). A fresh model draws the shared weights with the normal init either way.",
    )


class ModelConfig(Section):
    """The network: embedding -> stack of layers -> final norm -> LM head."""

    vocab_size: Optional[int] = Field(
        None, gt=0, description="Vocabulary size; null takes it from the tokenizer."
    )
    d_model: int = Field(128, gt=0, description="Width of the residual stream.")
    n_layers: Optional[int] = Field(
        None, gt=0, le=MAX_LAYERS,
        description="Number of layers (each layer is one sub-layer: a mixer or an MLP). "
        "With `pattern`, the pattern is tiled to this length; null means len(pattern).",
    )
    pattern: Optional[str] = Field(
        None,
        description="One character per layer, expanded into `layers` at load. Characters: "
        "`*` attention, `-` mlp, `M` mamba, `2` mamba2, `H` h3 (see the pattern table).",
    )
    layers: Optional[list[LayerSpec]] = Field(  # type: ignore[valid-type]
        None, description="Explicit per-layer specs, each with a `type` (a registered block)."
    )
    block_defaults: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per block type, field values applied to every layer of that type "
        "(pattern layers and list layers alike; a list layer's own fields win).",
    )
    norm: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description="Pre-norm type.")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the norms.")
    tie_embeddings: bool = Field(True, description="Share the embedding and LM-head weight.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on embeddings and sub-layer outputs.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal weight init.")
    residual: Literal["standard", "ladder"] = Field(
        "standard", description="`standard`: r = r + f_i(norm_i(r)). `ladder` (Zhang et al.): sub-layer i "
        "reads the residual stream without sub-layer i-1's output (added one step late), so that output's "
        "tensor-parallel all-reduce can overlap compute; the final norm reads r + the last output. A "
        "standard model's weights load into a ladder model (same parameters), but that changes the "
        "function: retrain / fine-tune after switching.",
    )
    recursive: Optional[RecursiveConfig] = Field(
        None, description="Relaxed recursive sharing of the layers (see below); null: every layer owns its weights.",
    )
    pos_embedding: Literal["none", "learned"] = Field(
        "none", description="Absolute position embeddings added to the token embeddings: `none` (positions "
        "come from the blocks, e.g. RoPE, or from SSM recurrence) or `learned` (a max_positions x d_model "
        "table, as in GPT-2).",
    )
    max_positions: Optional[int] = Field(
        None, gt=0, description="`pos_embedding: learned`: table length, the longest sequence the model reads "
        "(required then; unused otherwise).",
    )
    parallel_residual: bool = Field(
        False, description="Layers run in pairs (0,1), (2,3), ... that both read the same stream: "
        "r = r + f_2i(norm_2i(r)) + f_2i+1(norm_2i+1(r)) (GPT-NeoX / GPT-J style attention || MLP). "
        "Needs an even number of layers and `residual: standard`.",
    )

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        pattern, layers = data.get("pattern"), data.get("layers")
        defaults = data.get("block_defaults") or {}
        if not isinstance(defaults, dict):
            return data  # the field validator reports the type error
        chars = registry.pattern_chars()
        for name in defaults:
            if name not in registry.blocks():
                raise ValueError(
                    f"block_defaults.{name}: unknown block type; registered: {sorted(registry.blocks())}"
                )
        if pattern is not None and layers is not None:
            raise ValueError("pattern: give either `pattern` or `layers`, not both")
        if pattern is None and layers is None:
            raise ValueError("layers: give `layers` (a list) or `pattern` (a string)")
        if pattern is not None:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError("pattern: must be a non-empty string")
            for i, ch in enumerate(pattern):
                if ch not in chars:
                    raise ValueError(f"pattern[{i}]: unknown character {ch!r}; known: {_char_table()}")
            n = data.get("n_layers")
            if n is None:
                n = len(pattern)
            if not isinstance(n, int) or n <= 0 or n > MAX_LAYERS:
                return data  # field validation reports n_layers
            if n % len(pattern):
                raise ValueError(
                    f"n_layers: {n} is not a multiple of len(pattern)={len(pattern)} ({pattern!r})"
                )
            full = pattern * (n // len(pattern))
            data["layers"] = [{"type": chars[c]} for c in full]
            data["pattern"] = None
            data["n_layers"] = n
            layers = data["layers"]
        if isinstance(layers, list):
            merged = []
            for spec in layers:
                if isinstance(spec, BaseModel):
                    spec = spec.model_dump()
                if isinstance(spec, dict) and spec.get("type") in defaults:
                    spec = {**defaults[spec["type"]], **spec}
                merged.append(spec)
            data["layers"] = merged
            if data.get("n_layers") is None:
                data["n_layers"] = len(merged)
            elif isinstance(data.get("n_layers"), int) and data["n_layers"] != len(merged):
                raise ValueError(f"n_layers: {data['n_layers']} but `layers` has {len(merged)} entries")
        return data

    @model_validator(mode="after")
    def _check_layers(self) -> "ModelConfig":
        problems = []
        for i, spec in enumerate(self.layers or []):
            for fld, why in spec.check(self.d_model):
                problems.append(f"layers[{i}].{fld}: {why}")
        if self.pos_embedding == "learned" and self.max_positions is None:
            problems.append("max_positions: required when pos_embedding is learned")
        if self.parallel_residual:
            if len(self.layers or []) % 2:
                problems.append(f"parallel_residual: needs an even number of layers, got {len(self.layers or [])}")
            if self.residual != "standard":
                problems.append("parallel_residual: only with residual: standard")
        rc, layers = self.recursive, self.layers or []
        if rc is not None and not problems:
            if rc.groups > len(layers):
                problems.append(f"recursive.groups: {rc.groups} exceeds n_layers={len(layers)}")
            else:
                for i in range(rc.groups, len(layers)):
                    k = i % rc.groups
                    if layers[i] != layers[k]:
                        a, b = layers[i].model_dump(), layers[k].model_dump()
                        diff = (f"type={a['type']!r} vs {b['type']!r}" if a["type"] != b["type"] else
                                ", ".join(f"{f}={a[f]!r} vs {b[f]!r}" for f in a if a[f] != b[f]))
                        problems.append(f"layers[{i}]: runs shared block {k} (recursive.groups={rc.groups}) "
                                        f"so must equal layers[{k}], but differs in {diff}")
                        break
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TokenizerConfig(Section):
    """Which tokenizer turns text into ids (saved with every checkpoint)."""

    type: Literal["char", "byte", "sentencepiece", "hf"] = Field(
        "char", description="`char`: one id per character seen in the training files; "
        "`byte`: UTF-8 bytes (256 ids + EOS); `sentencepiece`: a trained BPE/unigram model; "
        "`hf`: the tokenizer of a local Hugging Face model directory (tokenizer.json or tokenizer.model)."
    )
    path: Optional[str] = Field(
        None, description="SentencePiece `.model` file (type sentencepiece) or Hugging Face model directory "
        "(type hf); required for those types."
    )

    @model_validator(mode="after")
    def _need_path(self) -> "TokenizerConfig":
        if self.type in ("sentencepiece", "hf") and not self.path:
            raise ValueError(f"path: required when type is {self.type}")
        return self


class TaskDataConfig(Section):
    """A synthetic task to train on instead of text (seqlm/data/tasks.py); L = train.seq_len."""

    type: Literal["mqar"] = Field("mqar", description="`mqar`: multi-query associative recall (Zoology's generator).")
    num_pairs: int = Field(4, gt=0, description="MQAR: key-value pairs per example (4 * num_pairs <= seq_len).")
    vocab_size: int = Field(8192, gt=3, description="MQAR: vocabulary (keys from the lower half, values from the upper).")
    n_train: int = Field(20000, gt=0, description="Training examples generated once (sampled with replacement).")
    n_val: int = Field(1000, gt=0, description="Held-out examples for the validation loss.")
    seed: int = Field(0, description="Generator seed (the validation set uses seed + 10000).")
    random_fill: bool = Field(True, description="MQAR: filler tokens random (Zoology) or 0.")


class SourceConfig(Section):
    """One source of a weighted mixture (`data.sources`)."""

    files: list[str] = Field(..., description="Data files, globs or directories of this source (as `data.files`).")
    weight: float = Field(1.0, gt=0, description="Sampling weight: a training window comes from this source "
                          "with probability weight / sum of weights (independent of the source's size).")
    text_field: Optional[str] = Field(None, description="Record field holding the text; null: `data.text_field`.")
    doc_separator: Optional[str] = Field(None, description="Document separator; null: `data.doc_separator`.")

    @field_validator("files")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must list at least one file")
        return v


class DataConfig(Section):
    """Training text: local files, tokenized once into a memmapped token cache."""

    files: list[str] = Field(
        default_factory=lambda: ["data/tinyshakespeare.txt"],
        description="Local `.txt`, `.jsonl`, `.parquet` or `.arrow` files (globs allowed) or directories "
        "(a Hugging Face dataset saved with `save_to_disk`, or a directory of data files). Each txt file / "
        "record is one document; documents are joined with EOS.",
    )
    sources: Optional[list[SourceConfig]] = Field(
        None, description="A weighted mixture instead of `files`: a list of `{files, weight, text_field, "
        "doc_separator}`; each source has its own token cache and train/val split."
    )
    text_field: str = Field("text", description="Record field holding the text in jsonl/parquet/arrow.")
    doc_separator: Optional[str] = Field(
        None, description="Split each txt file / record further into documents after every occurrence of "
        "this string (kept at the end of its document; whitespace-only documents are dropped), e.g. "
        "\"\\n\\n\" for blank-line paragraphs. null: one document per txt file / record."
    )
    packing: Literal["stream", "document"] = Field(
        "stream", description="`stream`: windows of the EOS-joined stream; `document`: the same windows, "
        "each with its document boundaries (`seq_idx`) so the model does not attend or carry state across them."
    )
    val_split: Literal["tokens", "documents"] = Field(
        "tokens", description="`tokens`: the last `val_fraction` of each source's tokens is validation; "
        "`documents`: its last whole documents holding about that fraction (no document in both splits)."
    )
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="The tokenizer (see below).")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Fraction of tokens held out for validation.")
    cache_dir: str = Field(".cache/seqlm", description="Where token caches are written.")
    num_workers: Optional[int] = Field(
        None, ge=1, description="Tokenizer processes (1: in this process); null: one per CPU core. The cache "
        "is the same for any count."
    )
    verify_cache: bool = Field(
        False, description="Rehash every data file on launch; by default a file is rehashed only when its "
        "size or times changed."
    )
    task: Optional[TaskDataConfig] = Field(
        None, description="Train on a synthetic task (e.g. MQAR) instead of `files`; the tokenizer is then "
        "the task's id tokenizer."
    )

    @field_validator("files")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must list at least one file")
        return v

    @model_validator(mode="after")
    def _files_or_sources(self) -> "DataConfig":
        if self.sources is not None:
            if not self.sources:
                raise ValueError("sources: must list at least one source (or remove it to use data.files)")
            if "files" in self.model_fields_set:
                raise ValueError("give data.files or data.sources, not both")
        if self.doc_separator == "":
            raise ValueError("doc_separator: must not be empty (null: no separator)")
        return self


class TrainConfig(Section):
    """Optimisation loop."""

    seq_len: int = Field(64, gt=0, description="Tokens per training window (block size).")
    batch_size: int = Field(12, gt=0, description="Windows per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_steps: int = Field(2000, gt=0, description="Optimizer steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    min_lr: float = Field(1e-4, ge=0, description="Final learning rate of cosine / wsd decay.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="`cosine`: warmup then cosine to min_lr; `wsd`: warmup, stable, "
        "then linear decay over the last `decay_fraction` of steps; `constant`: warmup then flat."
    )
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: fraction of steps spent decaying.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (2-D weights only).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.99, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm; 0 disables clipping.")
    seed: int = Field(1337, description="Seed for init, data sampling and dropout.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: cuda if available.")
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="`auto`: bf16 autocast on CUDA, and on CPUs with native bf16 matrix "
        "products (AMX-BF16 or AVX512-BF16 in /proc/cpuinfo, confirmed by a short timed probe), "
        "else fp32; the run prints which and why. `bf16` forces CPU autocast (far slower on CPUs "
        "without those units). The SSM kernels compute in fp32 either way."
    )
    activation_checkpointing: Literal["none", "layers", "every_k"] = Field(
        "none", description="Recompute activations in backward instead of keeping them: `layers` "
        "checkpoints each layer, `every_k` each run of `activation_checkpoint_k` layers (only the "
        "run's input is kept). Same gradients; less memory, about one more forward of compute."
    )
    activation_checkpoint_k: int = Field(2, gt=0, description="Layers per checkpointed run for `every_k`.")
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    threads: Optional[int] = Field(None, gt=0, description="torch CPU threads; null keeps torch's default.")
    out_dir: str = Field("runs/default", description="Checkpoints, logs, plots.")
    init_from: Optional[str] = Field(
        None, description="Start a fresh run (step 0, new optimizer and schedule) from this checkpoint's "
        "weights and tokenizer, e.g. to fine-tune a `seqlm convert recursive` output. The model section "
        "must describe the same network (use the checkpoint's config.yaml). Not for resuming: see --resume."
    )
    log_every: int = Field(10, gt=0, description="Steps between JSONL/TensorBoard train logs.")
    checkpoint_every: int = Field(
        0, ge=0, description="Steps between checkpoints; 0: only at the end (and on SIGINT / SIGTERM, "
        "which always checkpoint at the next step boundary).")
    keep_last: int = Field(
        2, gt=0, description="Step checkpoints kept in <out_dir>/checkpoint (the oldest are deleted only "
        "after a new one is complete).")
    max_bad_steps: int = Field(
        5, ge=0, description="Consecutive steps with a non-finite loss or gradient that are skipped (no "
        "update) before the run stops with a checkpoint of the state before them; 0: stop at the first.")
    progress: bool = Field(True, description="Show a tqdm progress bar.")


class EvalConfig(Section):
    """Validation during training and the sample printed at the end."""

    every: int = Field(250, ge=0, description="Steps between validation passes; 0: only at the end.")
    batches: int = Field(20, gt=0, description="Validation batches per pass.")
    sample_tokens: int = Field(200, ge=0, description="Tokens generated for the final sample.")
    sample_prompt: str = Field("\n", description="Prompt of the final sample.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature (0: greedy).")
    top_k: Optional[int] = Field(40, gt=0, description="Top-k filter for sampling; null: off.")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="Nucleus filter; null: off.")


class MemoryConfig(Section):
    """HMT (He et al.): segment-by-segment memory, sensory memory and recall (seqlm/memory/hmt.py)."""

    type: Literal["hmt"] = Field("hmt", description="Memory wrapper kind (only `hmt`).")
    segment_len: int = Field(
        128, gt=0, description="Tokens per segment; the backbone never sees more than "
        "segment_len + n_sensory + 2*n_memory positions at once. train.seq_len may span several segments.",
    )
    n_memory: int = Field(
        1, gt=0, description="Memory embeddings per segment (read at the front and written at the "
        "end of every segment; the paper uses 1).",
    )
    n_sensory: int = Field(
        16, ge=0, description="Sensory memory: the last n_sensory token embeddings of the previous "
        "segment are prepended to each segment (0: off). At most segment_len.",
    )
    recall: bool = Field(
        False, description="Stage 1 (false): a segment reads the previous segment's memory. Stage 2 "
        "(true): it reads a recall attention over the cache of the last recall_cache memories "
        "(adds a recall token and query/key projections; start it from a stage-1 checkpoint, see init_from).",
    )
    recall_cache: int = Field(32, gt=0, description="Stage 2: memory embeddings kept for recall.")
    recall_dim: Optional[int] = Field(
        None, gt=0, description="Stage 2: width of the recall query/key projections; null = d_model.",
    )
    query_len: Optional[int] = Field(
        None, gt=0, description="Stage 2: tokens the recall query pass reads; null = segment_len // 2 "
        "(the paper). At most segment_len.",
    )
    query_source: Literal["previous", "segment"] = Field(
        "previous", description="Stage 2: which tokens the query pass reads. `previous`: the last "
        "query_len tokens before the segment (causal; streaming and generation work). `segment`: the "
        "first query_len tokens of the segment itself, as in the paper; the predictions of those tokens "
        "then depend on a function of them (not causal), so only whole-window forward/loss accept it.",
    )
    bptt_depth: Optional[int] = Field(
        None, gt=0, description="Training: gradients flow through the memory of the last bptt_depth "
        "segments of each window; memories and sensory embeddings carried out of earlier segments are "
        "detached. null = the whole window.",
    )
    init_from: Optional[str] = Field(
        None, description="Checkpoint directory (a stage-1 HMT or a plain LM) whose weights and tokenizer "
        "initialise a fresh run; parameters it lacks (e.g. the stage-2 recall parameters) are newly "
        "initialised and listed. Ignored when resuming. Two-stage training: train a stage-1 config "
        "(recall: false), then a copy of it with recall: true and init_from: <stage-1 out_dir>/checkpoint "
        "(configs/hmt_stage1.yaml, configs/hmt_stage2.yaml).",
    )

    @model_validator(mode="after")
    def _check(self) -> "MemoryConfig":
        problems = []
        if self.n_sensory > self.segment_len:
            problems.append(f"n_sensory: {self.n_sensory} exceeds segment_len={self.segment_len}")
        if self.query_len is not None and self.query_len > self.segment_len:
            problems.append(f"query_len: {self.query_len} exceeds segment_len={self.segment_len}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class DistillStageConfig(Section):
    """One distillation stage (MOHAWK, Bick et al.; `seqlm distill`, seqlm/distill/)."""

    kind: Literal["orient", "align", "logits"] = Field(
        ..., description="`orient`: matrix orientation (each student mixer, fed the teacher's input to that "
        "layer, fits its materialised mixing matrix to the teacher's attention matrix; Frobenius distance "
        "averaged over batch and heads). `align`: hidden-state alignment (each student block's output fits "
        "the teacher block's output, L2, teacher inputs). `logits`: end-to-end KL to the teacher's "
        "distribution (with temperature) + weighted CE.",
    )
    name: Optional[str] = Field(
        None, description="Run-dir subfolder of the stage; null = `<index>-<kind>` (e.g. `2-align`).")
    steps: Optional[int] = Field(None, gt=0, description="Optimizer steps (give steps or tokens).")
    tokens: Optional[int] = Field(
        None, gt=0, description="Token budget; steps = ceil(tokens / (batch_size * seq_len * grad_accum)).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of the stage.")
    min_lr: Optional[float] = Field(None, ge=0, description="Final LR of cosine / wsd decay; null = lr / 10.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps of the stage.")
    schedule: Literal["cosine", "wsd", "constant"] = Field("cosine", description="LR schedule (as train.schedule).")
    trainable: Optional[Union[Literal["mixers", "all"], list[str]]] = Field(
        None, description="Which parameters train. `mixers`: the student layers paired with teacher attention "
        "layers (the converted mixers); `all`: every parameter; or a list of regexes over parameter names "
        "(re.search). null = `mixers` for orient/align, `all` for logits. The rest stay frozen "
        "(bit-identical).",
    )

    @model_validator(mode="after")
    def _budget(self) -> "DistillStageConfig":
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("steps: give exactly one of steps or tokens")
        if self.name is not None and not re.fullmatch(r"[\w.-]+", self.name):
            raise ValueError(f"name: must be a plain folder name, got {self.name!r}")
        return self


class FromTeacherConfig(Section):
    """The student is the teacher with chosen attention layers turned into other mixers."""

    pattern: str = Field(
        ..., description="One character per teacher layer (tiled when shorter, like model.pattern): `.` keeps "
        "the teacher's layer; `*` keeps an attention layer; `2` / `M` / `H` turn an attention layer into "
        "Mamba-2 / Mamba / H3, initialised from it (Mamba-in-the-Llama mapping, see the README); a non-attention "
        "layer may only be kept (`.` or its own character). E.g. `2-` (pure Mamba-2 from a `*-` teacher), "
        "`2-*-` (every other attention layer kept).",
    )
    block_defaults: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per new block type, fields not fixed by the mapping (e.g. "
        "`mamba2: {chunk_size: 32}`). The mapping fixes Mamba-2's expand 1, head_dim = d_state = the "
        "teacher's head dim and ngroups = n_heads, and Mamba's expand 1 and d_state = head dim.",
    )

    @field_validator("pattern")
    @classmethod
    def _chars(cls, v: str) -> str:
        chars = registry.pattern_chars()
        if not v:
            raise ValueError("must be a non-empty string")
        for i, ch in enumerate(v):
            if ch != "." and ch not in chars:
                raise ValueError(f"character {i} {ch!r} unknown (known: '.' = keep, {_char_table()})")
        return v


class DistillConfig(Section):
    """Distillation (`seqlm distill`): a teacher, a student and the stages that train it."""

    teacher: str = Field(
        ..., description="The teacher: a seqlm checkpoint (run root, step or model-only directory) or a local "
        "Hugging Face model directory (Llama, Mistral, GPT-2, ...). Its tokenizer is used for the data and "
        "for the student.",
    )
    teacher_dtype: Optional[Literal["fp32", "bf16"]] = Field(
        None, description="dtype the teacher runs in (no_grad, eval mode); null = the student's dtype.")
    from_teacher: Optional[FromTeacherConfig] = Field(
        None, description="Build the student from the teacher (give this or `student`).")
    student: Optional[ModelConfig] = Field(
        None, description="The student's own model section (any seqlm model, e.g. for logit-only "
        "distillation); give this or `from_teacher`. The top-level `model:` is not read by `seqlm distill`.",
    )
    student_init: Optional[str] = Field(
        None, description="With `student`: a seqlm checkpoint whose weights start the student (its tokenizer "
        "must be the teacher's); null = fresh initialisation.",
    )
    stages: list[DistillStageConfig] = Field(
        ..., min_length=1, description="Stages run in order, each from the previous one's weights "
        "(MOHAWK: orient, align, logits; logit-only distillation: just `logits`).",
    )
    temperature: float = Field(1.0, gt=0, description="KD temperature T (the KL term is scaled by T^2).")
    kl_weight: float = Field(1.0, ge=0, description="Weight of KL(teacher || student) in `logits` stages.")
    ce_weight: float = Field(0.0, ge=0, description="Weight of the data cross-entropy in `logits` stages.")

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        if (self.from_teacher is None) == (self.student is None):
            raise ValueError("from_teacher: give exactly one of from_teacher or student")
        if self.student_init is not None and self.student is None:
            raise ValueError("student_init: only with `student` (from_teacher starts from the teacher)")
        if self.kl_weight == 0 and self.ce_weight == 0:
            raise ValueError("kl_weight: kl_weight and ce_weight are both 0")
        names = [s.name for s in self.stages if s.name]
        if len(set(names)) != len(names):
            raise ValueError("stages: stage names must be unique")
        return self


class DistributedConfig(Section):
    """Multi-process training on DeepSpeed (used when a launcher starts several ranks:
    `deepspeed --num_gpus N train.py ...` or `torchrun --nproc_per_node N train.py ...`)."""

    tp_size: int = Field(
        1, gt=0, description="Tensor-parallel ranks per model replica (heads/channels of every block "
        "split across them); the world size must be a multiple; data-parallel size = world / tp_size.")
    zero_stage: Literal[0, 1, 2] = Field(
        0, description="DeepSpeed ZeRO stage over the data-parallel ranks: 0 plain DP, 1 optimizer "
        "state sharded, 2 optimizer state and gradients sharded.")
    overlap_comm: bool = Field(
        False, description="ZeRO: overlap the gradient reduction with the backward pass.")
    ladder_overlap: bool = Field(
        True, description="With residual: ladder and tp_size > 1, issue each sub-layer's row-parallel "
        "all-reduce asynchronously and wait for it one sub-layer later (Ladder Residual's point).")
    timeout_s: float = Field(
        300.0, gt=0, description="Collective timeout: a rank that died or hangs ends the job after this "
        "long with a message naming the rank.")
    deepspeed_config: Optional[str] = Field(
        None, description="Path to your own DeepSpeed JSON; its keys override the generated config "
        "(which is written to <out_dir>/deepspeed_config.json).")


class RunConfig(Section):
    """A whole run."""

    model: ModelConfig = Field(default_factory=lambda: ModelConfig(pattern="*-"), description="The network.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training text and tokenizer.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Validation and the final sample.")
    memory: Optional[MemoryConfig] = Field(
        None, description="Hierarchical memory (HMT) around the model; null: a plain LM."
    )
    distill: Optional[DistillConfig] = Field(
        None, description="Distillation (`seqlm distill`); null: not a distillation run."
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Multi-process training (DeepSpeed): TP, ZeRO, timeouts.")

    @model_validator(mode="after")
    def _memory_fits_model(self) -> "RunConfig":
        if self.memory is not None and self.model.pos_embedding != "none":
            raise ValueError("model.pos_embedding: learned positions are not supported with memory (HMT)")
        return self

    @model_validator(mode="after")
    def _check_tp(self) -> "RunConfig":
        tp = self.distributed.tp_size
        problems = []
        for i, spec in enumerate(self.model.layers or [] if tp > 1 else []):
            for fld, why in spec.tp_check(self.model.d_model, tp):
                problems.append(f"model.layers[{i}].{fld}: {why}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# --------------------------------------------------------------------------------------
# error formatting


def _path(loc: tuple, names: set[str]) -> str:
    out = ""
    prev_int = False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            prev_int = True
            continue
        if prev_int and part in names:  # discriminator tag of the union member
            prev_int = False
            continue
        prev_int = False
        if part in ("function-after[_need_path()]",) or str(part).startswith("function-"):
            continue
        if isinstance(part, str) and part.isidentifier():
            out += ("." if out else "") + part
        else:  # a key that is not a name (empty, spaces, control characters): quote it
            out += f"[{str(part)!r}]"
    return out


_LEAD = re.compile(r"^([A-Za-z_][\w]*(?:\[\d+\])*(?:\.[A-Za-z_][\w]*(?:\[\d+\])*)*): ")


def format_errors(err: ValidationError, prefix: str = "") -> str:
    names = set(registry.blocks())
    lines = []
    for e in err.errors():
        path = _path(tuple(e["loc"]), names)
        if prefix:
            path = prefix + ("." + path if path else "")
        msg = e["msg"]
        for p in ("Value error, ", "Assertion failed, "):
            if msg.startswith(p):
                msg = msg[len(p):]
        # validators phrase their errors as "<sub path>: reason"; join it to the location
        for part in msg.split("; "):
            m = _LEAD.match(part)
            if m:
                sub = m.group(1)
                full = f"{path}.{sub}" if path else sub
                lines.append(f"{full}: {part[m.end():]}")
            else:
                lines.append(f"{path or '<root>'}: {part}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a plain dict into a RunConfig, raising ConfigError naming each field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config {source}:\n" + format_errors(err)) from None


# --------------------------------------------------------------------------------------
# overrides and YAML


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict copy."""
    data = copy.deepcopy(data)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value (e.g. train.lr=3e-4)")
        key, raw = ov.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {ov!r}: empty key part")
        node = data
        for i, part in enumerate(parts[:-1]):
            m = re.fullmatch(r"(\w+)\[(\d+)\]", part)
            if m:
                lst = node.get(m.group(1))
                idx = int(m.group(2))
                if not isinstance(lst, list) or idx >= len(lst):
                    raise ConfigError(f"override {ov!r}: {'.'.join(parts[:i + 1])!r} does not exist")
                node = lst[idx]
                if not isinstance(node, dict):
                    raise ConfigError(f"override {ov!r}: {'.'.join(parts[:i + 1])!r} is not a section")
                continue
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {ov!r}: {'.'.join(parts[:i + 1])!r} is not a section")
            node = nxt
        last = parts[-1]
        m = re.fullmatch(r"(\w+)\[(\d+)\]", last)
        if m:
            lst = node.get(m.group(1))
            idx = int(m.group(2))
            if not isinstance(lst, list) or idx >= len(lst):
                raise ConfigError(f"override {ov!r}: {key!r} does not exist")
            lst[idx] = _parse_value(raw)
        else:
            node[last] = _parse_value(raw)
        if parts[0] == "model" and last in ("pattern", "layers"):
            node.pop("layers" if last == "pattern" else "pattern", None)
    return data


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r}: cannot be read ({e.strerror or e})") from None
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        raise ConfigError(f"config file {str(p)!r}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: top level must be a mapping of sections")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    return parse_config(data, str(path) if path is not None else "<defaults>")


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(dump_config(cfg))
