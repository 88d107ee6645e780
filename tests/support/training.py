"""Training helpers: tiny offline models, a char-level tokenizer, a config and a BuPOTrainer in one call, a toy
CLI workspace's rows, and a callback that snapshots parameters after each step."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from support.tiny_models import tiny_model

SPECIALS = ["<pad>", "<bos>", "<eos>"]  # ids 0, 1, 2 = tiny_models' pad/bos/eos
CHARS = ["\n", *(chr(c) for c in range(32, 127))]
VOCAB = len(SPECIALS) + len(CHARS)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def char_tokenizer():
    """A character-level fast tokenizer (WordLevel over single characters), left padding, a plain chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(layers: int = 4, tie: bool = False, seed: int = 0, **kw):
    m = tiny_model("qwen3", tie=tie, layers=layers, seed=seed, vocab_size=VOCAB, **kw)
    m.generation_config.eos_token_id = 2
    m.generation_config.pad_token_id = 0
    return m.train()


def letter_reward(completions, **kwargs):
    """Toy reward: the fraction of characters before 'A' in ASCII (about 1/3 for random text; continuous, so
    groups almost always have non-zero advantages and every update has a gradient)."""
    return [sum(ch < "A" for ch in c) / max(1, len(c)) for c in completions]


def make_dataset(n: int = 16):
    from datasets import Dataset

    prompts = [f"user: count {i} a's\nassistant: " for i in range(n)]
    return Dataset.from_dict({"prompt": prompts, "ground_truth": [str(i) for i in range(n)]})


def make_config(tmp_path, **kw):
    from bupo.training.config import BuPOConfig

    base = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
        per_device_train_batch_size=8, num_generations=4, max_completion_length=8, learning_rate=1e-2,
        max_steps=4, logging_steps=1, save_strategy="no", seed=0, internal_layer=1, internal_steps=2,
        temperature=1.0, probe_every=1, probe_size=2, disable_tqdm=True,
    )
    base.update(kw)
    return BuPOConfig(**base)


def make_trainer(tmp_path, model=None, reward=letter_reward, dataset=None, trainer_cls=None, trainer_kw=None, **kw):
    from bupo.training.trainer import BuPOTrainer

    torch.manual_seed(0)
    cls = trainer_cls or BuPOTrainer
    return cls(model=model if model is not None else make_model(), reward_funcs=reward,
               args=make_config(tmp_path, **kw), train_dataset=dataset if dataset is not None else make_dataset(),
               processing_class=char_tokenizer(), **(trainer_kw or {}))


TINY = ["--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "8",
        "--eval_samples", "2", "--eval_rows", "4", "--probe_every", "1", "--learning_rate", "1e-2"]


def toy_rows(n, offset=0):
    return [{"prompt": [{"role": "system", "content": "Put the answer in \\boxed{}."},
                        {"role": "user", "content": f"What is {i} + {i}?"}],
             "reward_model": {"ground_truth": str(2 * i)}, "data_source": "toy"} for i in range(offset, offset + n)]


class Snapshots(TrainerCallback):
    def __init__(self, trainer, names):
        self.trainer, self.names, self.after = trainer, names, {}
        self.state_after: dict[int, set[str]] = {}

    def on_step_end(self, args, state, control, **kw):
        params = dict(self.trainer.model.named_parameters())
        self.after[state.global_step] = {n: params[n].detach().clone() for n in self.names}
        opt = self.trainer.optimizer
        with_state = {n for n, p in params.items() if len(opt.state.get(p, {})) > 0}
        self.state_after[state.global_step] = with_state
