"""The lm-evaluation-harness model: any family, quantized or not, registered as "mlx_mamba".

    lm_eval.simple_evaluate(model=MambaLM("mamba2-model"), tasks=[...])

Tokenization follows lm-eval's Hugging Face model: text is encoded without special tokens; a
(context, continuation) pair moves the context's trailing spaces to the continuation, encodes
context + continuation whole and splits it after the context's own tokens (so the boundary is
tokenized as in running text); an empty context is the prefix token (BOS, else EOS).
loglikelihood scores through `scoring.continuation_logprobs` (shared contexts prefilled once);
loglikelihood_rolling cuts a text into lm-eval's rolling windows of `max_length` tokens and
sums them; generate_until decodes requests together (generate.Decoder) until a stop string,
EOS or the token limit. Needs the `eval` extra (pip install "mlx-mamba[eval]").
"""

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .decoder import Decoder, Row, eos_token_ids
from .detokenizer import StreamingDetokenizer
from .prompt_cache import prefill
from .sample import make_sampler
from .scoring import ScoringError, continuation_logprobs

DEFAULT_MAX_TOKENS = 256  # generated tokens when a task names no max_gen_toks (lm-eval's default)


@register_model("mlx_mamba")
class MambaLM(TemplateLM):
    """model: a loaded model with its `tokenizer`, or a path or repo id to load (with
    `tokenizer`: another tokenizer's directory or repo id, as `load` takes).
    max_length: the tokens the model reads before each scored token (lm-eval's window);
    max_tokens: generated tokens per request (None: each task's own, else 256);
    reuse_context: prefill a context shared by several requests once.
    lm-eval makes it by name as well: simple_evaluate(model="mlx_mamba", model_args={"model":
    path, ...}), passing `max_batch_size` and `device`, which MLX has no use for."""

    def __init__(self, model, tokenizer=None, *, batch_size=8, max_length=2048, max_tokens=None,
                 reuse_context=True, seed=None, max_batch_size=None, device=None):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ScoringError(f"batch size {batch_size!r}: expected a positive integer")
        if isinstance(model, str):
            from .loader import load

            model, tokenizer = load(model, tokenizer=tokenizer)
        if tokenizer is None:
            raise ScoringError("the model has no tokenizer: pass one (--tokenizer)")
        if tokenizer.eos_token_id is None and tokenizer.bos_token_id is None:
            raise ScoringError("the tokenizer has neither a BOS nor an EOS token, one of which "
                               "stands for an empty context")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length, self.max_tokens = batch_size, max_length, max_tokens
        self.reuse_context, self.seed = reuse_context, seed
        self._samplers = {}  # temperature -> sampler, shared by the rows that use it

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self):
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self):
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens):
        return self.tokenizer.decode(tokens)

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        # requests: [((context, continuation), context ids, continuation ids)]
        with tqdm(total=len(requests), desc="Scoring", disable=disable_tqdm) as bar:
            return continuation_logprobs(
                self.model, [(c, t) for _, c, t in requests], batch_size=self.batch_size,
                max_length=self.max_length, reuse=self.reuse_context, progress=bar.update)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        windows, owners = [], []  # each window's (context ids, continuation ids); its text
        for n, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for window in get_rolling_token_windows(tokens, self.prefix_token_id,
                                                    self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(n)
        scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows],
                                            disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, scores):
            totals[n] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        """Each request's text up to the first of its `until` strings (a string or a list), EOS,
        or max_gen_toks tokens; sampled at its temperature when it asks for do_sample, else
        greedy. Up to batch_size requests decode together (decoder.Decoder: each
        gets the tokens it gets alone); a request leaves at its stop string and the next joins.
        Like lm-eval's model, a context keeps its last max_length - max_tokens tokens."""
        waiting = [self._row(n, *request.args) for n, request in enumerate(requests)][::-1]
        texts, stops, detokenizers = [""] * len(requests), {}, {}
        decoder = Decoder(self.model)
        with tqdm(total=len(requests), desc="Generating", disable=disable_tqdm) as bar:
            while waiting or len(decoder):
                joining = [waiting.pop() for _ in range(min(len(waiting),
                                                            self.batch_size - len(decoder)))]
                if joining:
                    rows = [row for row, _ in joining]
                    cache = self.model.make_cache(len(rows))
                    prefill(self.model, [row.tokens[:-1] for row in rows], cache)
                    decoder.join(cache, rows)
                    for row, until in joining:
                        stops[row.key] = until
                        detokenizers[row.key] = StreamingDetokenizer(self.tokenizer)
                for n, token, _, finish, _ in decoder.step():
                    detokenizer = detokenizers[n]
                    texts[n] += detokenizer.add_token(token) if finish != "stop" else ""
                    texts[n] += detokenizer.finalize() if finish else ""
                    found = [texts[n].find(s) for s in stops[n] if s and s in texts[n]]
                    if found:
                        texts[n] = texts[n][:min(found)]
                        if not finish:
                            decoder.drop(n)
                    if found or finish:
                        bar.update(1)
        return texts

    def _row(self, n, context, settings):
        """(request n's decoder Row, its stop strings)."""
        until = settings.get("until") or []
        max_tokens = self.max_tokens or settings.get("max_gen_toks", DEFAULT_MAX_TOKENS)
        temp = float(settings.get("temperature", 0.0)) if settings.get("do_sample") else 0.0
        if temp not in self._samplers:
            self._samplers[temp] = make_sampler(temp, seed=self.seed if temp else None)
        ids = self.tok_encode(context)[-max(1, self.max_length - max_tokens):]
        row = Row(n, ids or [self.prefix_token_id], self._samplers[temp], [], max_tokens,
                  eos_token_ids(self.tokenizer))
        return row, [until] if isinstance(until, str) else list(until)
