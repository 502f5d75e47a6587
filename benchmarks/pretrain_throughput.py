"""Pretraining throughput: tokens/s of our Lightning stage, the model FLOP/s it implies, and that as a fraction of
this machine's matmul FLOP/s measured in the same process; plus the ratio to a plain PyTorch loop on the same model.

    python benchmarks/pretrain_throughput.py                 # default model (conf/model/tiny.yaml), 32 x 128
    python benchmarks/pretrain_throughput.py --steps 40 --precisions 32-true bf16-mixed --override model.n_embd=256

Model FLOPs per token use the standard estimate 6 * N_matmul + 12 * n_layer * d_model * seq_len (forward +
backward; N_matmul = parameters that take part in matmuls, lm_head included, position embeddings excluded).
"""

from __future__ import annotations

import argparse
import os
import time
from statistics import median

import torch


def matmul_flops(dtype: torch.dtype, sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 10) -> float:
    """Best FLOP/s of square matmuls in `dtype` on the current torch threads (the machine's practical peak)."""
    best_rate = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            a @ b
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best_rate = max(best_rate, 2 * n**3 / (time.perf_counter() - t))
    return best_rate


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module(config_module="rlhf_conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=["hydra.run.dir=.", "paths.output_dir=.", *overrides])


def build(cfg, vocab: int):
    """The model our stage would build (tokenizer size `vocab`), with a fake tokenizer so no training data is needed."""
    from framework.instantiate import instantiate_plugin
    from framework.interfaces import ModelSource

    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 0, 0, 1

        def __len__(self):
            return vocab

    torch.manual_seed(0)
    return instantiate_plugin(cfg.model, "model", ModelSource).build(Tok())


def flops_per_token(model, seq_len: int) -> float:
    c = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name and "position" not in name)
    layers = getattr(c, "n_layer", None) or c.num_hidden_layers
    d = getattr(c, "n_embd", None) or c.hidden_size
    return 6 * n + 12 * layers * d * seq_len


def plain_loop(model, batches, lr: float) -> float:
    """Tokens/s of a bare PyTorch loop: forward, shifted CE, backward, clip, AdamW step."""
    from plugins.losses.lm import shifted_token_loss

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    times = []
    for b in batches:
        t = time.perf_counter()
        loss, _ = shifted_token_loss(model(input_ids=b).logits, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t)
    return batches[0].numel() / median(times[len(times) // 5 :])


def lightning_stage(model, cfg, batches, precision: str) -> float:
    """Tokens/s of our CausalLMModule under the Lightning Trainer (no logger, no checkpoints)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from framework.stages.lm_module import CausalLMModule
    from framework.stages.pretrain import PackedBlocks
    from plugins.losses.lm import LMCrossEntropy

    class Timer(pl.Callback):
        def __init__(self):
            self.times, self.t = [], None

        def on_train_batch_start(self, *args):
            self.t = time.perf_counter()

        def on_train_batch_end(self, *args):
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    module = CausalLMModule(model, LMCrossEntropy(), dict(cfg.stage.optimizer), dict(cfg.stage.scheduler))
    data = DataLoader(PackedBlocks([b.tolist() for batch in batches for b in batch]), batch_size=batches[0].size(0))
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=len(batches), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=1.0, callbacks=[timer], limit_val_batches=0, inference_mode=False)
    trainer.fit(module, train_dataloaders=data)
    return batches[0].numel() / median(timer.times[len(timer.times) // 5 :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="training steps per measurement (first 20%% are warmup)")
    parser.add_argument("--vocab", type=int, default=4096, help="tokenizer size the model is built for")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides, e.g. model.n_embd=256")
    args = parser.parse_args()

    import logging
    import warnings

    import pytorch_lightning  # noqa: F401 - imported first so that the level set below sticks

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    cfg = compose(args.override)
    seq, bs = int(cfg.stage.seq_len), int(cfg.stage.batch_size)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(2, args.vocab, (bs, seq), generator=g) for _ in range(args.steps)]
    peak = {"32-true": matmul_flops(torch.float32), "bf16-mixed": matmul_flops(torch.bfloat16)}

    model = build(cfg, args.vocab)
    fpt = flops_per_token(model, seq)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"matmul peak fp32 {peak['32-true'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16-mixed'] / 1e9:.0f} GFLOP/s")
    print(f"model: {cfg.model.get('arch', 'from path')} {n_params / 1e6:.2f} M params; batch {bs} x {seq} tokens; "
          f"{fpt / 1e6:.1f} MFLOP per token\n")
    rows = [("plain PyTorch loop", "32-true", plain_loop(build(cfg, args.vocab), batches, cfg.stage.optimizer.lr))]
    for precision in args.precisions:
        rows.append(("rlhf-lab CausalLMModule", precision, lightning_stage(build(cfg, args.vocab), cfg, batches, precision)))
    base = rows[0][2]
    print(f"| {'run':<24} | {'precision':<10} | {'tokens/s':>9} | {'GFLOP/s':>8} | {'of matmul peak':>14} | {'vs plain':>8} |")
    print(f"|{'-' * 26}|{'-' * 12}|{'-' * 11}|{'-' * 10}|{'-' * 16}|{'-' * 10}|")
    for name, precision, tps in rows:
        achieved = tps * fpt
        print(f"| {name:<24} | {precision:<10} | {tps:>9.0f} | {achieved / 1e9:>8.1f} | "
              f"{achieved / peak[precision]:>13.1%} | {tps / base:>7.2f}x |")


if __name__ == "__main__":
    main()
