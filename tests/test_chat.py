"""`python -m mlx_mamba.chat` driven through stdin: each turn feeds only its new tokens (counted
against the chat template's rendering of the whole conversation), /save then /load continues
exactly as the session that saved, Ctrl-C stops a reply and keeps the session."""

import json
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

import mlx_mamba
from mlx_mamba.chat import ChatSession
from server_fixtures import write_tokenizer
from test_server import ROOT

STATS = re.compile(r"\[prompt: (\d+) tokens, [\d.]+ tokens-per-sec; generation: (\d+) tokens")


@pytest.fixture(scope="module")
def chat_model(checkpoint, tmp_path_factory):
    """flavour -> a tiny checkpoint with the ChatML tokenizer (ids < 100)."""
    made = {}

    def make(flavour):
        if flavour not in made:
            directory = tmp_path_factory.mktemp(f"chat-{flavour}")
            shutil.copytree(checkpoint(flavour)[0], directory, dirs_exist_ok=True)
            write_tokenizer(directory)
            made[flavour] = directory
        return made[flavour]

    return make


def chat(model_dir, lines, *flags):
    done = subprocess.run([sys.executable, "-m", "mlx_mamba.chat", "--model", str(model_dir),
                           *flags], input="".join(line + "\n" for line in lines),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def replies(output):
    """(reply text, prompt tokens, generated tokens) of each turn in the REPL's output."""
    found = []
    for match in STATS.finditer(output):
        before = output[:match.start()]
        text = before[before.rindex(">> ") + 3:-1]  # the reply ends with a newline
        found.append((text, int(match[1]), int(match[2])))
    return found


@pytest.mark.parametrize("flavour", ["mamba2_groups_untied", "granite_dense"])
def test_turns_feed_only_their_new_tokens(chat_model, flavour):
    directory = chat_model(flavour)
    model, tokenizer = mlx_mamba.load(directory)
    questions = ["Hello there", "How are you?", "Tell me more."]
    turns = replies(chat(directory, questions, "--max-tokens", "12"))
    assert len(turns) == 3
    messages, held = [], 0
    for question, (text, prompt_tokens, generated) in zip(questions, turns):
        messages.append({"role": "user", "content": question})
        everything = tokenizer.encode(tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        assert prompt_tokens == len(everything) - held
        # The state now holds the conversation and the reply's tokens (its EOS included).
        held = len(everything) + generated
        messages.append({"role": "assistant", "content": text})
        assert generated == len(tokenizer.encode(text, add_special_tokens=False)) + \
            (generated < 12)
        assert "<unk>" not in text  # (re-encodes to the tokens generated)
    # The same conversation in one process: the same replies.
    session = ChatSession(model, tokenizer, max_tokens=12)
    assert [session.send(q).text for q in questions] == [text for text, _, _ in turns]


def test_save_then_load_continues_the_same_conversation(chat_model, tmp_path):
    directory = chat_model("granite_dense")
    saved = tmp_path / "session.safetensors"
    flags = ("--max-tokens", "10", "--temp", "0", "--system-prompt", "Be brief.")
    first = replies(chat(directory, ["One", "Two", f"/save {saved}", "Three", "Four"], *flags))
    resumed = replies(chat(directory, [f"/load {saved}", "Three", "Four"], *flags))
    assert resumed == first[2:]
    fresh = replies(chat(directory, ["Three", "Four"], *flags))
    assert fresh != resumed  # the state mattered
    # A /reset forgets it.
    reset = replies(chat(directory, [f"/load {saved}", "/reset", "Three", "Four"], *flags))
    assert reset == fresh
    # A damaged file is one error line, and the session goes on.
    saved.write_bytes(b"not a cache")
    done = subprocess.run([sys.executable, "-m", "mlx_mamba.chat", "--model", str(directory)],
                          input=f"/load {saved}\nHi\n", capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0 and done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr and len(replies(done.stdout)) == 1


def test_ctrl_c_stops_a_reply_and_keeps_the_session(chat_model, tmp_path):
    """A tokenizer without EOS: replies end only at max_tokens (a million) or on Ctrl-C."""
    directory = tmp_path / "no-eos"
    shutil.copytree(chat_model("mamba2_groups_untied"), directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_mamba.chat", "--model", str(directory), "--max-tokens",
         "1000000", "--temp", "1", "--seed", "3"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, bufsize=0)
    output = queue.Queue()
    threading.Thread(target=lambda: [output.put(c) for c in iter(
        lambda: process.stdout.read(1), "")], daemon=True).start()

    def read_until(pattern, seconds=120):
        text = ""
        while not re.search(pattern, text):
            text += output.get(timeout=seconds)
        return text

    try:
        read_until(r">> $")
        process.stdin.write("Talk forever\n")
        process.stdin.flush()
        read_until(r"[^\s>]{20}")  # the reply is streaming
        process.send_signal(signal.SIGINT)
        stopped = read_until(r"\]\n>> $")
        assert "interrupted" in stopped
        process.stdin.write("And again\n")  # the session goes on from where it stopped
        process.stdin.flush()
        read_until(r"[^\s>]{20}")
        process.send_signal(signal.SIGINT)
        stopped = read_until(r"\]\n>> $")
        assert "interrupted" in stopped
        process.stdin.write("/exit\n")
        process.stdin.flush()
        assert process.wait(60) == 0
    finally:
        process.kill()
