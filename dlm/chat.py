"""Talk to a model in the terminal: `python -m dlm.chat run=<run folder | .ckpt>`.

    python -m dlm.chat run=runs/mdlm-tiny/<time>
    python -m dlm.chat run=<run> steps=64 temperature=0 max_new_tokens=128 live=false
    python -m dlm.chat run=<run> block_length=32 system="You are terse."

A multi-turn conversation: each user line is appended to the history, the history is rendered by
``dlm.data.chat.chat_ids`` (the tokenizer's chat template, else the plain one) and the model's reply (the family's
``generate`` with the run's sampler, cut at EOS: :mod:`dlm.conversation`) is appended to it. The oldest turns are
dropped when the history no longer fits the model's context. After each reply one dim line gives the reply's
tokens, tokens/s (over the reply's tokens, its EOS included) and the network calls.

``live=true`` shows the denoising as it happens: the reply's masked positions as a placeholder, tokens appearing as
they unmask, redrawn in place (stdout a terminal; otherwise only the final text is printed).

Commands: ``/reset`` (forget the conversation), ``/steps N``, ``/temp T``, ``/help``, ``/exit`` (EOF, Ctrl-D,
exits too).
"""

from __future__ import annotations

import shutil
import sys
import unicodedata
from dataclasses import dataclass
from typing import IO, Any

import hydra
import torch
from omegaconf import DictConfig

from dlm import checks
from dlm.config import CONF_DIR, ConfigError, exit_on_bad_overrides, register_resolvers
from dlm.errors import EXIT_USER_ERROR, UserError, user_errors

register_resolvers()

HELP = "commands: /reset (forget the conversation), /steps N, /temp T, /help, /exit (or Ctrl-D)"
USER_PROMPT = "you> "
MODEL_PROMPT = "model> "
DIM, RESET, CLEAR_DOWN = "\x1b[2m", "\x1b[0m", "\x1b[J"


@dataclass
class Settings:
    """The chat's sampler settings (None: the run's sampler's own value) and reply length."""

    steps: int | None
    temperature: float | None
    block_length: int | None
    max_new_tokens: int


def check_request(cfg: DictConfig) -> None:
    problems = checks.collect(
        checks.run_given(cfg, "a run folder (printed as `run_dir: ...` by python -m dlm.train) or a .ckpt inside "
                              "<run>/checkpoints/"),
        checks.integer(cfg, "steps", 1, nullable=True, null_means=": the sampler's own"),
        checks.number(cfg, "temperature", 0, nullable=True),
        checks.integer(cfg, "block_length", 1, nullable=True, null_means=": the sampler's own"),
        checks.integer(cfg, "max_new_tokens", 1),
        checks.integer(cfg, "seed", 0, 2**32 - 1),
        checks.boolean(cfg, "live"),
        checks.boolean(cfg, "use_ema"),
        checks.torch_device(cfg),
    )
    for key in ("system", "placeholder"):
        if cfg.get(key) is not None and not isinstance(cfg.get(key), str):
            problems.append(f"{key}={cfg.get(key)!r} must be text (quote it: {key}='...')")
    if problems:
        raise ConfigError(problems)


def printable(text: str) -> str:
    """The text with control characters (an escape sequence a model emitted would drive the terminal) shown as
    U+FFFD; newlines and tabs kept."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else "\ufffd" for c in text)


class LiveView:
    """The reply as it denoises: ``update(ids)`` after every step draws it (masked positions as ``placeholder``)
    over the previous drawing; ``finish(text)`` draws the final text. Only on a terminal: elsewhere both print
    nothing until ``finish``."""

    def __init__(self, out: IO[str], tokenizer, mask_id: int, placeholder: str = "·", tty: bool | None = None,
                 stop_ids: tuple[int, ...] | None = None):
        self.out, self.tok, self.mask_id, self.placeholder = out, tokenizer, int(mask_id), placeholder
        self.stop_ids = stop_ids or (int(tokenizer.eos_token_id),)  # EOS and the model's end-of-turn tokens
        self.tty = out.isatty() if tty is None else tty
        self.rows = 0  # terminal rows of the last drawing

    def _draw(self, text: str) -> None:
        width = max(shutil.get_terminal_size((80, 24)).columns, 1)
        up = f"\x1b[{self.rows - 1}A" if self.rows > 1 else ""
        shown = MODEL_PROMPT + printable(text)
        self.out.write("\r" + up + CLEAR_DOWN + shown)
        self.out.flush()
        self.rows = sum(max(1, -(-len(line) // width)) for line in shown.split("\n"))

    def start(self, positions: int) -> None:
        if self.tty:
            self._draw(self.placeholder * positions)

    def update(self, ids: torch.Tensor) -> None:
        if self.tty:
            from dlm.conversation import render_partial

            self._draw(render_partial(self.tok, ids.tolist(), self.mask_id, self.stop_ids, self.placeholder))

    def finish(self, text: str) -> None:
        if self.tty and self.rows:
            self._draw(text)
            self.out.write("\n")
        else:
            self.out.write(MODEL_PROMPT + printable(text) + "\n")
        self.rows = 0
        self.out.flush()


def stats_line(reply, tty: bool) -> str:
    rate = reply.tokens / max(reply.seconds, 1e-9)
    line = (f"{reply.tokens} tokens{'' if reply.stopped else ' (no EOS / end of turn: max_new_tokens reached)'} | "
            f"{rate:.1f} tokens/s | {reply.network_calls} network calls | {reply.seconds:.2f} s")
    return f"{DIM}{line}{RESET}" if tty else line


class ChatSession:
    """A conversation with a model: the history, the sampler under the current settings, one generator for the
    whole session (replies differ turn to turn; the session is reproducible from its seed)."""

    def __init__(self, model, settings: Settings, seed: int = 0, system: str | None = None):
        from dlm.conversation import chat_sampler

        self.model, self.settings, self.system = model, settings, system
        self.sampler = chat_sampler(model, settings.steps, settings.temperature, settings.block_length)
        device = model.module.compute_device
        torch.manual_seed(seed)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.history: list[dict[str, str]] = []

    def reset(self) -> None:
        self.history = []

    def set(self, **changes: Any) -> None:
        """New sampler settings (steps=, temperature=); the sampler refuses a bad value and the old ones stay."""
        from dlm.conversation import chat_sampler

        new = Settings(**{**self.settings.__dict__, **changes})
        self.sampler = chat_sampler(self.model, new.steps, new.temperature, new.block_length)
        self.settings = new

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reply(self, text: str, on_step=None):
        """Append the user's ``text``, generate the reply, append it; returns the :class:`dlm.conversation.Reply`.
        A failure (a message the tokenizer cannot encode, one too long) leaves the history as it was."""
        from dlm.conversation import fit_history, generate_reply

        max_len, n = self.model.max_len, self.settings.max_new_tokens
        budget = None if max_len is None else max_len - n - 2  # 2: a start / shift / time token some families add
        if budget is not None and budget < 1:
            raise UserError(f"max_new_tokens={n} leaves no room for a prompt in the model's {max_len} positions")
        messages = fit_history(self.model.tokenizer, self.messages() + [{"role": "user", "content": text}], budget)
        reply = generate_reply(self.model, messages, self.sampler, n, self.generator, on_step=on_step)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}]
        return reply


def command(session: ChatSession, line: str, out: IO[str]) -> bool:
    """Run a /command; False when it ends the chat."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        out.write("(conversation cleared)\n")
    elif name in ("/steps", "/temp"):
        key, kind = ("steps", int) if name == "/steps" else ("temperature", float)
        try:
            value = kind(arg)
        except ValueError:
            out.write(f"error: {name} needs {'an integer' if kind is int else 'a number'}, e.g. "
                      f"{name} {'32' if kind is int else '0.7'}\n")
            return True
        session.set(**{key: value})
        out.write(f"(sampler: {session.sampler!r})\n")
    elif name == "/help":
        out.write(HELP + "\n")
    else:
        out.write(f"unknown command {name}; {HELP}\n")
    return True


def read_line(stdin: IO[str], out: IO[str]) -> str | None:
    """The next line without its newline; None at EOF. A terminal gets input()'s line editing."""
    if stdin is sys.stdin and stdin.isatty() and out is sys.stdout:
        try:
            return input(USER_PROMPT)
        except EOFError:
            return None
    out.write(USER_PROMPT)
    out.flush()
    line = stdin.readline()
    if line and not stdin.isatty():  # piped input: echo it, so that the transcript reads as a conversation
        out.write(line if line.endswith("\n") else line + "\n")
    return None if line == "" else line.rstrip("\n")


def chat_loop(session: ChatSession, stdin: IO[str], out: IO[str], live: bool = True, placeholder: str = "·") -> int:
    """Read lines until /exit or EOF; each line is a command or a message the model replies to. Returns 0."""
    from dlm.conversation import reply_stops

    tty = out.isatty()
    out.write(f"chatting with {session.model.source} | sampler: {session.sampler!r} | {HELP}\n")
    while True:
        try:
            line = read_line(stdin, out)
        except KeyboardInterrupt:
            line = None
        if line is None:
            out.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        view = None
        try:
            if line.startswith("/"):
                if not command(session, line, out):
                    return 0
                continue
            view = LiveView(out, session.model.tokenizer, session.model.module.mask_id, placeholder,
                            tty=tty and live, stop_ids=reply_stops(session.model))
            if view.tty:
                view.start(session.settings.max_new_tokens)
            reply = session.reply(line, on_step=view.update if view.tty else None)
            view.finish(reply.text)
            out.write(stats_line(reply, tty) + "\n")
        except (UserError, ValueError) as err:  # ValueError: e.g. a character the run's tokenizer has no id for
            out.write(("\n" if view is not None and view.rows else "") + f"error: {err}\n")
        except KeyboardInterrupt:
            out.write("\n(reply interrupted)\n")
        out.flush()


def run_chat(cfg: DictConfig, stdin: IO[str] | None = None, out: IO[str] | None = None) -> int:
    check_request(cfg)
    from dlm.conversation import chat_model_of, load_chat_model

    if cfg.get("model") is not None:  # a checkpoint from its model config (its conventions: tokenizer, sampler)
        from dlm.run import load_requested_model, plain

        loaded = load_requested_model(device=cfg.get("device", "cpu"))
        # its sampler config as load_model composed it: the model's convention already applied, sampler= honoured
        model = chat_model_of(loaded.module, loaded.datamodule.tokenizer, f"model={loaded.choices.get('model')}",
                              plain(loaded.cfg.get("sampler")))
    else:
        model = load_chat_model(cfg.run, ckpt=cfg.get("ckpt", "last"), device=cfg.get("device", "cpu"),
                                use_ema=bool(cfg.get("use_ema", True)))
    settings = Settings(cfg.get("steps"), cfg.get("temperature"), cfg.get("block_length"), int(cfg.max_new_tokens))
    session = ChatSession(model, settings, seed=int(cfg.seed), system=cfg.get("system"))
    return chat_loop(session, stdin or sys.stdin, out or sys.stdout, live=bool(cfg.live),
                     placeholder=str(cfg.get("placeholder") or "·"))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="chat")
def hydra_main(cfg: DictConfig) -> None:
    from dlm.run import NotARunError

    try:
        with user_errors():
            code = run_chat(cfg)
    except (NotARunError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(code)


TEXT_KEYS = ("system", "placeholder")


def main() -> None:
    from dlm.generate import quote_text_overrides

    sys.argv[1:] = quote_text_overrides(sys.argv[1:], TEXT_KEYS)
    exit_on_bad_overrides(sys.argv[1:], "chat")  # e.g. sampler=nosuch: one message
    hydra_main()


if __name__ == "__main__":
    main()
