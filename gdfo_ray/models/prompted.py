"""A transformer body with prompt embeddings injected at ``{prompt}`` and a C-way readout, and its builder."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from gdfo_ray.exceptions import ConfigError
from gdfo_ray.models.devices import host_tensor, pick_device, resolve_dtype
from gdfo_ray.models.encoding import EncodedSplit, encode_split
from gdfo_ray.models.loading import load_lm, verbalizer_token_ids
from gdfo_ray.tasks import Split, TaskSpec, text_first_template

READOUTS = ("verbalizer", "linear", "verbalizer_residual")


def length_chunks(lengths: Sequence[int], max_rows: int, max_tokens: "int | None",
                  new_tokens: "Sequence[int] | None" = None) -> list:
    """Row indices in forwards of similar lengths (length bucketing), shortest first.

    A forward holds at most ``max_rows`` rows and, padded to its longest row, at most
    ``max_tokens`` tokens (one row at least): long rows then go in smaller forwards,
    so padding stays a small share of the work. ``new_tokens`` counts, where rows read
    cached states, only the tokens a forward computes (default: ``lengths``).
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    cost = np.asarray(lengths if new_tokens is None else new_tokens)
    chunks, start = [], 0
    while start < len(order):
        stop = min(start + max_rows, len(order))
        if max_tokens is not None:
            while stop - start > 1 and (stop - start) * cost[order[start:stop]].max() > max_tokens:
                stop -= 1
        chunks.append(order[start:stop])
        start = stop
    return chunks


class PromptedLM(nn.Module):
    """A transformer body with prompt embeddings injected at ``{prompt}`` and a C-way readout.

    ``readout="verbalizer"`` scores the verbalizer tokens with the LM head at the slot
    (teacher, or an LM student); ``readout="linear"`` puts a trainable C x h head on
    the slot's hidden state (an encoder student); ``readout="verbalizer_residual"`` adds
    such a head, started at zero, to the verbalizer scores (a sibling student: it starts
    as the truncated teacher reads and learns what the blocks left out add). ``separate_text`` reads each example
    apart from the prompt (:func:`~gdfo_ray.tasks.text_first_template`), so that the
    text's states can be cached (:meth:`cache_prefixes`) even in an encoder.
    """

    def __init__(self, tokenizer, model, kind: str, spec: TaskSpec, readout: str, model_name: str,
                 max_text_tokens: int = 128, max_rows_per_forward: int = 256, separate_text: bool = False,
                 max_tokens_per_forward: "int | None" = None):
        super().__init__()
        self.tokenizer, self.model, self.kind, self.spec = tokenizer, model, kind, spec
        self.max_text_tokens = max_text_tokens
        self.max_rows = max_rows_per_forward
        self.max_tokens = max_tokens_per_forward
        # The text first and the tokens before {prompt} attending only to each other, as in a causal LM:
        # for an encoder a different model from the plain one, whose text tokens see the prompt.
        self.separate_text = separate_text
        self.template = spec.template_for(kind)
        if separate_text:
            self.template = text_first_template(self.template)
        self.embeddings = model.get_input_embeddings()
        self.hidden_size = self.embeddings.weight.shape[1]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.readout = readout
        self.encoded: dict[str, EncodedSplit] = {}
        self.cached_splits: set = set()
        self._prefix_kv: dict = {}  # split -> (prefix lengths, [(keys, values) per layer]) or None: no cache
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, but got {readout!r}.")
        self.head = None
        if readout != "linear":
            if kind == "encoder":
                raise ConfigError(f"{model_name!r} has no LM head to score verbalizer words.")
            self.verbalizer_ids = verbalizer_token_ids(tokenizer, spec.verbalizer, model_name)
        if readout != "verbalizer":
            self.head = nn.Linear(self.hidden_size, spec.n_classes)
        if readout == "verbalizer_residual":  # starts as the verbalizer readout exactly
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def add_split(self, name: str, split: Split) -> None:
        self.encoded[name] = encode_split(self.tokenizer, self.template, self.kind, split, self.max_text_tokens)
        self._prefix_kv.pop(name, None)

    def cache_prefixes(self, splits: Sequence[str]) -> None:
        """Reuse the key/value states of the tokens before ``{prompt}`` on these splits.

        For a causal LM (or an encoder built with ``separate_text``) those tokens never
        see the prompt, so their states are the same in every call: computed once, each
        call then runs only the prompt and the tokens after it. It pays when the template
        puts the prompt after the text (``task.prompt_placement="suffix"``); the weights
        must stay frozen.
        """
        if self.kind == "causal_lm" or self.separate_text:
            self.cached_splits = set(splits)

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    def embedding_std(self) -> float:
        return float(self.embeddings.weight.detach().float().std())

    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        return self.embeddings(torch.as_tensor(list(ids), device=self.device)).detach()

    def forward(self, prompts: torch.Tensor, rows: np.ndarray, split: str,
                deep: "DeepPrompts | None" = None) -> torch.Tensor:
        """Scores of R rows: ``prompts`` (R, n, h) with ``rows`` (R,) example indices -> (R, C)."""
        return self.score(prompts, rows, self.encoded[split], prefix_kv=self._text_cache(split), deep=deep)

    def _text_cache(self, split: str):
        """The split's cached states of the tokens before the prompt, or None; decided once per split."""
        if split in self.cached_splits and split not in self._prefix_kv:
            enc = self.encoded[split]
            pays = self.separate_text or self._prefix_pays(enc)
            self._prefix_kv[split] = self._compute_prefix_kv(enc) if pays else None
        return self._prefix_kv.get(split)

    def score(self, prompts: torch.Tensor, rows: np.ndarray, enc: EncodedSplit, prefix_kv=None,
              deep: "DeepPrompts | None" = None) -> torch.Tensor:
        """As :meth:`forward`, on examples encoded elsewhere (a service's request)."""
        n = prompts.shape[1]
        lengths = [len(enc.before[r]) + n + len(enc.after[r]) for r in rows]
        cached = prefix_kv is not None or self.separate_text  # the text before the prompt is not recomputed
        new_tokens = [n + len(enc.after[r]) for r in rows] if cached else None
        out = [None] * len(rows)
        for chunk in length_chunks(lengths, self.max_rows, self.max_tokens, new_tokens):
            index = torch.as_tensor(chunk)
            chunk_prompts, chunk_rows = prompts[index], [rows[i] for i in chunk]
            chunk_deep = None if deep is None else deep.values[deep.owner[index]]
            if prefix_kv is not None:
                scores = self._forward_chunk_cached(chunk_prompts, chunk_rows, enc, prefix_kv, chunk_deep)
            elif self.separate_text:  # a split not cached: its rows' text states, computed for this chunk
                unique, at = np.unique(chunk_rows, return_inverse=True)
                chunk_kv = self._compute_prefix_kv(enc, unique.tolist())
                scores = self._forward_chunk_cached(chunk_prompts, chunk_rows, enc, chunk_kv, chunk_deep,
                                                    kv_rows=at.reshape(-1))
            else:
                scores = self._forward_chunk(chunk_prompts, chunk_rows, enc, chunk_deep)
            for j, i in enumerate(chunk):
                out[i] = scores[j]
        return torch.stack(out)

    def forward_shared(self, prompts: torch.Tensor, owner: np.ndarray, rows: np.ndarray, split: str) -> torch.Tensor:
        """Scores of R rows where row i reads prompt ``owner[i]`` of ``prompts`` (k, n, h) -> (R, C).

        In a causal LM the tokens before a row's text (the template's head and the prompt)
        do not see the text. When every row of a prompt has the same head, that prefix's
        key/value states are computed once per prompt and each row runs only its own
        tokens: with BBT's ``{prompt} {text}`` placement a call then does the prompt's work
        once, not once per example. Anything else (an encoder, heads that differ within a
        prompt, such as the text before a suffix prompt; no prompt tokens; a row read at
        the prompt's last token, with no tokens of its own) takes the per-row path.
        """
        owner, rows = np.asarray(owner), np.asarray(rows)
        heads = self._shared_heads(self.encoded[split], prompts, owner, rows)
        if heads is None:
            return self(prompts[host_tensor(owner, prompts.device)], rows, split)
        return self._score_behind_prompts(prompts, heads, owner, rows, self.encoded[split])

    def score_shared(self, prompts: torch.Tensor, owner: np.ndarray, rows: np.ndarray, enc: EncodedSplit
                     ) -> torch.Tensor:
        """As :meth:`forward_shared`, on examples encoded elsewhere (a service's requests)."""
        owner, rows = np.asarray(owner), np.asarray(rows)
        heads = self._shared_heads(enc, prompts, owner, rows)
        if heads is None:
            return self.score(prompts[host_tensor(owner, prompts.device)], rows, enc)
        return self._score_behind_prompts(prompts, heads, owner, rows, enc)

    def _score_behind_prompts(self, prompts: torch.Tensor, heads: list, owner: np.ndarray, rows: np.ndarray,
                              enc: EncodedSplit) -> torch.Tensor:
        """Each row's own tokens, attending to its prompt's states (computed here, once per prompt)."""
        prefix_kv = self._compute_prompt_kv(prompts, heads)
        none = prompts.new_zeros((1, 0, self.hidden_size))
        out = [None] * len(rows)
        for chunk in length_chunks([len(enc.after[r]) for r in rows], self.max_rows, self.max_tokens):
            scores = self._forward_chunk_cached(none.expand(len(chunk), -1, -1), rows[chunk].tolist(), enc,
                                                prefix_kv, kv_rows=owner[chunk])
            for j, i in enumerate(chunk):
                out[i] = scores[j]
        return torch.stack(out)

    def _shared_heads(self, enc: EncodedSplit, prompts: torch.Tensor, owner: np.ndarray, rows: np.ndarray
                      ) -> "list | None":
        """Each prompt's template head (the ids before ``{prompt}``), or None where the prompts' states cannot
        be shared (see :meth:`forward_shared`)."""
        if self.kind != "causal_lm" or self.separate_text or prompts.shape[1] == 0:
            return None
        if any(not enc.after[r] for r in rows):
            return None
        heads: list = [None] * len(prompts)
        for c, r in zip(owner.tolist(), rows.tolist()):
            if heads[c] is None:
                heads[c] = enc.before[r]
            elif heads[c] != enc.before[r]:
                return None
        return [h if h is not None else [] for h in heads]

    def _compute_prompt_kv(self, prompts: torch.Tensor, heads: list) -> tuple:
        """Keys and values of each prompt behind its template head, right-padded to the longest (k rows)."""
        n = prompts.shape[1]
        lengths = torch.as_tensor([len(h) + n for h in heads], device=self.device)
        width = int(lengths.max())

        def inputs(start: int, stop: int) -> dict:
            part = heads[start:stop]
            ids, mask = self._padded([h + [self.pad_id] * n for h in part], width)
            embeds = self.embeddings(ids)
            at = torch.as_tensor([len(h) for h in part], device=self.device)[:, None] + torch.arange(
                n, device=self.device)
            owner = torch.arange(len(part), device=self.device)[:, None].expand(-1, n)
            embeds = embeds.index_put((owner, at), prompts[start:stop].to(embeds.dtype))
            return {"inputs_embeds": embeds, "attention_mask": mask}

        return lengths, self._key_values(len(heads), inputs)

    def _key_values(self, n_rows: int, inputs: "Callable[[int, int], dict]") -> list:
        """Each layer's (keys, values) of ``n_rows`` rows, run ``max_rows`` at a time on ``inputs(start, stop)``."""
        from transformers import DynamicCache

        tables: list = []
        with torch.no_grad():
            for start in range(0, n_rows, self.max_rows):
                # An encoder keeps no cache of its own (use_cache is for decoders), but fills one it is given.
                cache = DynamicCache()
                self.model.base_model(**inputs(start, min(start + self.max_rows, n_rows)), past_key_values=cache,
                                      use_cache=True)
                tables.append([(layer.keys, layer.values) for layer in cache.layers])
        return [(torch.cat([t[i][0] for t in tables]), torch.cat([t[i][1] for t in tables]))
                for i in range(len(tables[0]))]

    def transformer_layers(self) -> nn.ModuleList:
        """The body's stack of layers, where deep prompts go in (Llama/Mistral/Qwen, BERT/RoBERTa, GPT-2)."""
        body = self.model.base_model
        for path in ("layers", "encoder.layer", "h", "decoder.layers", "transformer.h"):
            found = body
            for part in path.split("."):
                found = getattr(found, part, None)
            if isinstance(found, nn.ModuleList):
                return found
        raise ConfigError(
            f"Deep prompts need the layer stack of {type(self.model).__name__}, which is not in one of the known "
            "places (layers, encoder.layer, h). Use method 'bbt', or a Llama-, BERT- or GPT-2-style model."
        )

    def layer_input_std(self, split: str, n_examples: int = 16) -> list[float]:
        """Scale of the hidden states entering each layer on a few examples: each deep prompt's scale (BBTv2).

        A robust std (1.4826 x the median absolute deviation): a few massive activations
        (the first token's, in Llama-style models) put SmolLM2's plain std at 180 from
        layer 12 on, against 2.7 for the typical entry.
        """
        enc = self.encoded[split]
        seqs = [enc.before[r] + enc.after[r] for r in range(min(n_examples, len(enc.before)))]
        ids, mask = self._padded(seqs, max(len(s) for s in seqs))
        with torch.no_grad():
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        keep = mask.bool()
        # hidden_states[l] enters layer l for l < L (the last entry is the body's output).
        scales = []
        for h in hidden[: len(self.transformer_layers())]:
            values = h[keep].float()
            scales.append(float(1.4826 * (values - values.median()).abs().median()))
        return scales

    @contextlib.contextmanager
    def _deep_prompts(self, deep: "torch.Tensor | None", positions: "torch.Tensor | None"):
        """Add ``deep[:, l - 1]`` (R, n, h) to the prompt positions (R, n) of the hidden states entering layer l."""
        if deep is None or deep.shape[1] == 0:
            yield
            return
        layers = self.transformer_layers()
        if deep.shape[1] >= len(layers):
            raise ConfigError(f"Got prompts for {deep.shape[1] + 1} layers, but the model has {len(layers)}.")
        rows = torch.arange(deep.shape[0], device=self.device)[:, None].expand(-1, deep.shape[2])

        def adder(values: torch.Tensor):
            def hook(module, args, kwargs):
                if args:
                    return (args[0].index_put((rows, positions), values.to(args[0].dtype), accumulate=True),
                            *args[1:]), kwargs
                h = kwargs["hidden_states"]
                return args, {**kwargs, "hidden_states": h.index_put((rows, positions), values.to(h.dtype),
                                                                     accumulate=True)}
            return hook

        handles = [layers[l].register_forward_pre_hook(adder(deep[:, l - 1]), with_kwargs=True)
                   for l in range(1, deep.shape[1] + 1)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _forward_chunk(self, prompts: torch.Tensor, rows: list, enc: EncodedSplit,
                       deep: "torch.Tensor | None" = None) -> torch.Tensor:
        n = prompts.shape[1]
        seqs = [enc.before[r] + [self.pad_id] * n + enc.after[r] for r in rows]
        ids, mask = self._padded(seqs, max(len(s) for s in seqs))
        embeds = self.embeddings(ids)
        positions = None
        if n:
            starts = torch.as_tensor([len(enc.before[r]) for r in rows], device=self.device)
            positions = starts[:, None] + torch.arange(n, device=self.device)
            row_index = torch.arange(len(rows), device=self.device)[:, None].expand(-1, n)
            embeds = embeds.index_put((row_index, positions), prompts.to(embeds.dtype))
        slots = torch.as_tensor([len(enc.before[r]) + n + enc.slot[r] for r in rows], device=self.device)
        with self._deep_prompts(deep, positions):
            hidden = self.model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        at_slot = hidden[torch.arange(len(rows), device=self.device), slots]
        return self._read(at_slot).float()

    def _padded(self, seqs: list, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids right-padded to ``width`` and their attention mask, on the model's device."""
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = torch.as_tensor(seq)
            mask[i, : len(seq)] = 1
        return ids.to(self.device), mask.to(self.device)

    @staticmethod
    def _prefix_pays(enc: EncodedSplit) -> bool:
        lengths = [len(b) for b in enc.before]
        return min(lengths) >= 1 and float(np.mean(lengths)) >= 4

    def _compute_prefix_kv(self, enc: EncodedSplit, rows: "Sequence[int] | None" = None) -> tuple:
        """Keys and values of the tokens before the prompt of ``rows`` (default: all), right-padded to the longest.

        The result is indexed by position in ``rows``.
        """
        before = enc.before if rows is None else [enc.before[r] for r in rows]
        lengths = torch.as_tensor([len(b) for b in before], device=self.device)
        width = int(lengths.max())

        def inputs(start: int, stop: int) -> dict:
            ids, mask = self._padded(before[start:stop], width)
            return {"input_ids": ids, "attention_mask": mask}

        return lengths, self._key_values(len(before), inputs)

    def _forward_chunk_cached(self, prompts: torch.Tensor, rows: list, enc: EncodedSplit, prefix_kv,
                              deep: "torch.Tensor | None" = None, kv_rows: "np.ndarray | None" = None
                              ) -> torch.Tensor:
        """The prompt and the tokens after it, attending to the cached prefix of each row's example.

        ``kv_rows`` locates each row's prefix in ``prefix_kv`` (default: its example index).
        """
        from transformers import DynamicCache

        lengths, layers = prefix_kv
        index = host_tensor(rows if kv_rows is None else kv_rows, self.device)
        prefix = lengths[index]
        width = int(prefix.max())
        n, r = prompts.shape[1], len(rows)
        after = [enc.after[i] for i in rows]
        tail = max(len(a) for a in after)
        ids, tail_mask = self._padded(after, tail)
        mask = torch.cat([(torch.arange(width, device=self.device)[None, :] < prefix[:, None]).long(),
                          torch.ones((r, n), dtype=torch.long, device=self.device), tail_mask], dim=1)
        embeds = torch.cat([prompts.to(self.embeddings.weight.dtype), self.embeddings(ids)], dim=1)
        positions = prefix[:, None] + torch.arange(n + tail, device=self.device)
        cache = DynamicCache(ddp_cache_data=[(k[index, :, :width], v[index, :, :width]) for k, v in layers])
        at_prompt = torch.arange(n, device=self.device)[None, :].expand(r, -1)  # the prompt opens the new tokens
        with self._deep_prompts(deep, at_prompt):
            hidden = self.model.base_model(inputs_embeds=embeds, attention_mask=mask.to(self.device),
                                           position_ids=positions, past_key_values=cache,
                                           use_cache=True).last_hidden_state
        slots = torch.as_tensor([n + enc.slot[i] for i in rows], device=self.device)
        return self._read(hidden[torch.arange(r, device=self.device), slots]).float()

    def _read(self, at_slot: torch.Tensor) -> torch.Tensor:
        if self.readout == "linear":
            return self.head(at_slot.float())
        logits = self._verbalizer_logits(at_slot)
        if self.head is not None:  # verbalizer_residual
            return logits.float() + self.head(at_slot.float())
        return logits

    def _verbalizer_logits(self, at_slot: torch.Tensor) -> torch.Tensor:
        if self.kind == "causal_lm":
            out = self.model.get_output_embeddings()
            bias = out.bias[self.verbalizer_ids] if getattr(out, "bias", None) is not None else None
            return nn.functional.linear(at_slot, out.weight[self.verbalizer_ids], bias)
        for name in ("lm_head", "cls", "generator_lm_head"):  # masked-LM heads: transform + decoder
            head = getattr(self.model, name, None)
            if head is not None:
                return head(at_slot)[:, self.verbalizer_ids]
        raise ConfigError(
            f"Don't know the MLM head of {type(self.model).__name__}; pass a BERT/RoBERTa-style masked LM "
            "or a causal LM."
        )


@dataclass
class DeepPrompts:
    """Per-layer prompts of k candidates, ``values`` (k, L - 1, n, h) for layers 1..L-1, and each
    row's candidate, ``owner`` (R,): rows index into the candidates instead of copying them."""

    values: torch.Tensor
    owner: torch.Tensor


def build_prompted_lm(name: str, kind: str, spec: TaskSpec, splits: dict, *, readout: str, dtype: str,
                      device: str, max_text_tokens: int, max_rows_per_forward: int,
                      need_lm_head: bool, separate_text: bool = False, layers: "int | None" = None,
                      max_tokens_per_forward: "int | None" = None) -> PromptedLM:
    dtype = resolve_dtype(dtype, pick_device(device))
    tokenizer, model, kind = load_lm(name, kind, dtype, need_lm_head=need_lm_head, layers=layers)
    if readout == "auto":
        readout = "linear" if kind == "encoder" else "verbalizer"
    lm = PromptedLM(tokenizer, model, kind, spec, readout, name, max_text_tokens, max_rows_per_forward,
                    separate_text=separate_text, max_tokens_per_forward=max_tokens_per_forward)
    for split_name, split in splits.items():
        lm.add_split(split_name, split)
    return lm.to(pick_device(device))
