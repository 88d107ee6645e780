"""The settings of one analysis (:class:`AnalysisConfig`) and their validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bupo.analysis.summary import DEFAULT_BOUNDARY_TOL, check_convention
from bupo.data.templates import TEMPLATES

TOKEN_DTYPES = ("float16", "float32")

#: which token positions of a ``P``-token prompt + ``R``-token response are analysed (position ``t`` holds the
#: distribution that predicts token ``t + 1``), and how far each sits after bupo's default; recorded in summary.json.
#: ``predicting`` (default): ``P-1 .. P+R-2``, each position whose prediction is a response token, so every row's
#: log-prob is that of a token the model actually produced. ``official``: ``P .. P+R-1``, the response tokens' own
#: positions, as the official script slices ``hidden_states[P'+1:]`` with its prompt length ``P'`` = the index of the
#: first "assistant" token + 1 (= ``P - 1`` when the prompt ends with "assistant" + one newline token, as chat
#: templates of the ChatML family do); its last row predicts what follows the response (the EOS token is used).
POSITIONS: dict[str, int] = {"predicting": 0, "official": 1}
POSITION_CONVENTIONS: dict[str, str] = {
    "predicting": "position t predicts token t+1; analysed positions are P-1 .. P+R-2 for a P-token prompt and an "
                  "R-token response (every position whose prediction is a response token); logp = log-prob of that "
                  "realised token (the row's token_id)",
    "official": "the official script's hidden_states[P'+1:] with P' = index of the first 'assistant' token + 1 "
                "(= P-1 for a prompt ending 'assistant' + newline): analysed positions are P .. P+R-1 for a P-token "
                "prompt and an R-token response (each response token's own position; row i holds response token "
                "token_id = response[i]); logp = log-prob of the token after it (response[i+1], the EOS token "
                "after the last one)",
}

#: ``bupo analyze --preset NAME``: settings that replace bupo's defaults (flags given explicitly still win).
#: ``official``: the official analysis script (visualization/plot_internal_entropy.py with scripts/run_eval.sh's
#: responses): 10 samples, up to 3072 generated tokens at T = 1, top_p 1, the model's own chat template (Qwen3: the
#: thinking mode, its default), the model in fp32.
PRESETS: dict[str, dict[str, object]] = {
    "official": {"max_samples": 10, "max_new_tokens": 3072, "temperature": 1.0, "top_p": 1.0, "template": "chat",
                 "dtype": "float32", "positions": "official"},
}
#: what a preset does NOT reproduce, recorded next to it in summary.json
PRESET_DIFFERENCES: dict[str, str] = {
    "official": "responses from HF generate, not vLLM; the analysed sequence ends with the response (its EOS "
                "included), while the official hidden_states[P+1:] runs to the end of the re-templated conversation, "
                "so it also holds the position of the newline the chat template writes after the EOS; the official "
                "final-policy entropies start one position later still (P+2), bupo's final_entropy uses the layers' "
                "positions",
}


@dataclass
class AnalysisConfig:
    """Every setting of one analysis (the model and its inputs are arguments of :func:`bupo.analysis.analyze`).

    Field order and ``metadata["help"]`` follow TRL's config dataclasses, so the settings read (and can be
    turned into command-line flags) the same way. Conventions: 0-based layers ``k`` (paper layer ``k + 1``),
    entropies in nats, projection ``raw`` (paper) | ``final_norm`` (logit lens).
    """

    max_samples: int | None = field(default=None, metadata={"help": "analyse at most N rows / traces (None: all)"})
    max_new_tokens: int = field(default=512, metadata={"help": "tokens generated per response (data rows only)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the generation (paper: 1.0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the generation"})
    seed: int = field(default=0, metadata={"help": "generation seed (row i is seeded by its index)"})
    projection: str = field(default="raw", metadata={
        "help": "raw = lm_head(h) (the paper) or final_norm = lm_head(final_norm(h)) (logit lens)"})
    positions: str = field(default="predicting", metadata={
        "help": "analysed positions: predicting = P-1 .. P+R-2 (each position whose prediction is a response token) "
        "or official = P .. P+R-1 (the official script's, one later; POSITION_CONVENTIONS)"})
    delta: str = field(default="bupo", metadata={"help": "ΔH convention: bupo (the paper) or residual"})
    template: str = field(default="auto", metadata={
        "help": "prompt template for message prompts: auto (as bupo train and bupo eval pick it, "
        "bupo.data.templates.resolve_template), " + ", ".join(TEMPLATES)})
    dtype: str = field(default="auto", metadata={
        "help": "weights dtype when the model is a path: auto (the checkpoint's own), float32, bfloat16, float16; "
        "entropies are computed in fp32 either way"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:i] when the model is a path"})
    chunk_size: int | None = field(default=None, metadata={
        "help": "rows per logits chunk (extra memory ~ chunk x vocab x 4 bytes); None: 1024 on CPU, up to 8192 on CUDA"})
    epilogue: str = field(default="auto", metadata={
        "help": "entropy epilogue: eager, compiled, triton (CUDA) or auto; same numbers to ~1e-5 nats"})
    batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per analysis forward"})
    gen_batch_size: int = field(default=32, metadata={"help": "prompts per generation batch"})
    backend: str = field(default="hf", metadata={"help": "generation engine: hf, vllm or auto (bupo.engines)"})
    token_dtype: str = field(default="float16", metadata={
        "help": "storage dtype of per-token entropies / log-probs in tokens.parquet (summaries are fp32)"})
    boundary_tol: float = field(default=DEFAULT_BOUNDARY_TOL, metadata={
        "help": "boundary rule tolerance, relative to the largest mean FFN ΔH (docs/analysis.md)"})
    heatmap_sample: int | None = field(default=None, metadata={
        "help": "sample index of the layer x token heatmap and the logit-lens table (None: the first analysed)"})
    lens_top: int = field(default=5, metadata={"help": "top tokens per layer and projection in the lens table"})
    figures: bool = field(default=True, metadata={"help": "write figures and report.html (needs an out_dir)"})
    keep_tokens: bool | None = field(default=None, metadata={
        "help": "hold the per-token table in the result (None: only when there is no out_dir)"})
    resume: bool = field(default=True, metadata={"help": "resume from staged shards of an unfinished run"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished analysis in out_dir"})
    progress: bool = field(default=False, metadata={"help": "progress bars"})
    preset: str | None = field(default=None, metadata={
        "help": "the named settings these came from (PRESETS: official), recorded in summary.json; None: bupo's"})

    def validate(self, *, out_dir: Path | None) -> None:
        """Raise ValueError (one line saying what is accepted) for any bad setting."""
        from bupo.generation import validate_sampling
        from bupo.internal.adapters import check_projection
        from bupo.internal.stats import EPILOGUES

        check_projection(self.projection)
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; accepted: {', '.join(PRESETS)}")
        check_convention(self.delta)
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions {self.positions!r}; accepted: {', '.join(POSITIONS)}")
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"unknown epilogue {self.epilogue!r}; accepted: {', '.join(EPILOGUES)}")
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"unknown token_dtype {self.token_dtype!r}; accepted: {', '.join(TOKEN_DTYPES)}")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise ValueError(f"max_samples must be a positive int, got {self.max_samples!r}")
        for name, v in (("chunk_size", 1 if self.chunk_size is None else self.chunk_size),
                        ("batch_tokens", self.batch_tokens), ("lens_top", self.lens_top)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        validate_sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                          top_k=None)
        if self.figures and out_dir is None:
            raise ValueError("figures need an out_dir (or pass figures=False)")
        hs = self.heatmap_sample
        if hs is not None and (not isinstance(hs, int) or isinstance(hs, bool)):
            raise ValueError(f"heatmap_sample must be a sample index (int) or None, got {hs!r}")
