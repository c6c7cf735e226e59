"""An agent's tool-use loop against a real Hearth sandbox, through MCP.

The loop is what every coding agent runs: show the model the tools, send it the
conversation, run the tool it calls, hand back the result, until it answers without a
tool call. The tools come from `hearth mcp` (spawned over stdio by the official MCP
Python SDK); the sandbox is a microVM the server creates on the first tool call.

No model is reachable where this runs in CI, so `ReplayModel` replays recorded assistant
turns (transcript.json) and checks every tool result against what the recording expects:
a result that does not match stops the run with a non-zero exit. `AnthropicModel` shows
where a real model plugs in; its API key is read here, by the host process, and never
reaches the sandbox (the sandbox sees only the tool calls).

    python agent.py --transcript transcript.json        # replay (what the test runs)
    python agent.py --anthropic "Write fizzbuzz with tests"   # a real model (not run in CI)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

from mcp import Client, StdioServerParameters


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class Turn:
    """One assistant turn: words, and at most one tool call (none: the agent is done)."""

    text: str
    tool_call: ToolCall | None = None
    expect: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolResult:
    text: str
    is_error: bool


class Mismatch(Exception):
    """A tool result differs from what the transcript expects."""


class Model(Protocol):
    """What the loop needs of a model."""

    def next_turn(self, tools: list[dict[str, Any]], history: list[dict[str, Any]]) -> Turn: ...

    def observe(self, turn: Turn, result: ToolResult) -> None:
        """Sees the result of the turn's tool call (a replay checks it; a model need not)."""


class ReplayModel:
    """Recorded turns, replayed in order; each tool result is checked against `expect`."""

    def __init__(self, transcript: dict[str, Any]):
        self.turns = [
            Turn(
                text=t.get("assistant", ""),
                tool_call=ToolCall(t["tool_call"]["name"], t["tool_call"].get("arguments", {})) if "tool_call" in t else None,
                expect=t.get("expect", {}),
            )
            for t in transcript["turns"]
        ]
        self.position = 0

    def next_turn(self, tools, history):
        if self.position >= len(self.turns):
            return Turn(text="(transcript ended)")
        turn = self.turns[self.position]
        self.position += 1
        if turn.tool_call and turn.tool_call.name not in {t["name"] for t in tools}:
            raise Mismatch(f"the transcript calls {turn.tool_call.name}, which the server does not offer")
        return turn

    def observe(self, turn, result):
        e = turn.expect
        problems = []
        if e.get("is_error", False) != result.is_error:
            problems.append(f"is_error is {result.is_error}, expected {e.get('is_error', False)}")
        problems += [f"missing {s!r}" for s in e.get("contains", []) if s not in result.text]
        problems += [f"unexpected {s!r}" for s in e.get("not_contains", []) if s in result.text]
        if problems:
            raise Mismatch(f"{turn.tool_call.name}: {'; '.join(problems)}\n--- result ---\n{result.text}")


class AnthropicModel:
    """A real model through the Anthropic Messages API (a sketch: not run in CI).

    `pip install anthropic`, set ANTHROPIC_API_KEY. The key stays in this process: the
    sandbox only ever receives the tool calls the model makes. Any OpenAI-compatible
    chat API works the same way: send `tools` as function definitions (name,
    description, parameters = the MCP input schema), read back `tool_calls`.
    """

    def __init__(self, task: str, model: str = "claude-sonnet-4-5"):
        import anthropic  # imported here: the replay needs no model SDK

        self.client = anthropic.Anthropic(api_key=os.environ["ANTHROPIC_API_KEY"])
        self.model = model
        self.messages: list[dict[str, Any]] = [{"role": "user", "content": task}]
        self.pending_id: str | None = None

    def next_turn(self, tools, history):
        reply = self.client.messages.create(
            model=self.model,
            max_tokens=4096,
            tools=[{"name": t["name"], "description": t["description"], "input_schema": t["input_schema"]} for t in tools],
            messages=self.messages,
        )
        self.messages.append({"role": "assistant", "content": reply.content})
        text = "".join(b.text for b in reply.content if b.type == "text")
        calls = [b for b in reply.content if b.type == "tool_use"]
        if not calls:
            return Turn(text=text)
        self.pending_id = calls[0].id
        return Turn(text=text, tool_call=ToolCall(calls[0].name, calls[0].input))

    def observe(self, turn, result):
        self.messages.append(
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": self.pending_id, "content": result.text, "is_error": result.is_error}],
            }
        )


def server() -> StdioServerParameters:
    """`hearth mcp` over stdio, with the Hearth key (the sandbox's, not the model's)."""
    env = {k: os.environ[k] for k in ("HEARTH_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PATH", "HOME") if k in os.environ}
    command = os.environ.get("HEARTH_MCP_COMMAND", "hearth")
    return StdioServerParameters(command=command, args=["mcp", "--on-exit", "terminate"], env=env)


async def agent_loop(model: Model, max_turns: int = 50) -> str | None:
    """Runs the loop; returns why it failed (a mismatch), or None."""
    async with Client(server()) as mcp:
        try:
            await turns(mcp, model, max_turns)
        except Mismatch as e:
            # Caught inside the session, so the server still shuts down in order.
            return str(e)
    return None


async def turns(mcp: Client, model: Model, max_turns: int) -> None:
    """Turns until the model answers without a tool call."""
    tools = [
        {"name": t.name, "description": t.description or "", "input_schema": t.input_schema}
        for t in (await mcp.list_tools()).tools
    ]
    history: list[dict[str, Any]] = []
    for _ in range(max_turns):
        turn = model.next_turn(tools, history)
        print(f"assistant: {turn.text}")
        if turn.tool_call is None:
            return
        call = turn.tool_call
        print(f"  → {call.name}({json.dumps(call.arguments)[:200]})")
        r = await mcp.call_tool(call.name, call.arguments, read_timeout_seconds=900)
        result = ToolResult(
            text="".join(c.text for c in r.content if getattr(c, "type", "") == "text"),
            is_error=r.is_error,
        )
        print("  ← " + ("ERROR " if result.is_error else "") + result.text[:400].replace("\n", "\n    "))
        history.append({"call": call.name, "arguments": call.arguments, "result": result.text, "is_error": result.is_error})
        model.observe(turn, result)
    raise RuntimeError(f"no final answer after {max_turns} turns")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--transcript", help="replay recorded turns, checking every tool result")
    g.add_argument("--anthropic", metavar="TASK", help="run a real model (needs ANTHROPIC_API_KEY)")
    a = p.parse_args()
    if a.transcript:
        with open(a.transcript) as f:
            model: Model = ReplayModel(json.load(f))
    else:
        model = AnthropicModel(a.anthropic)
    failure = asyncio.run(agent_loop(model))
    if failure:
        print(f"MISMATCH: {failure}")
        return 1
    if isinstance(model, ReplayModel):
        if model.position < len(model.turns):
            print(f"MISMATCH: the loop stopped at turn {model.position} of {len(model.turns)}")
            return 1
        print("all tool results matched the transcript")
    return 0


if __name__ == "__main__":
    sys.exit(main())
