"""``metaclaw demo``: the whole loop on the embedded default, offline, on a laptop CPU.

A LangGraph agent (``langchain.agents.create_agent``) with four tools serves a stream of requests through
``MetaClawChatModel`` (SmolLM2-135M, local backend) with ``MetaClawCallbackHandler`` attached; the task's
programmatic reward scores the captured turns; the MadMax scheduler is fed a *simulated* idle keyboard
(labelled as such: a demo cannot wait for you to leave) and opens a training window; the trainer trains,
the candidate is evaluated on held-out captured prompts and hot-swapped in while the agent keeps serving;
the simulated user comes back and MadMax closes the window; then the agent is measured again on prompts it
never saw. Ends with held-out reward before vs after (95% intervals) and a PNG plot.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.messages import HumanMessage
from langchain_core.tools import BaseTool, StructuredTool
from pydantic import create_model

from langchain_metaclaw.tasks import SYSTEM, TaskPrompt, ToolCallFormatTask, mean_ci95
from langchain_metaclaw.tasks import TOOLS as TASK_TOOLS

if TYPE_CHECKING:
    from langchain_metaclaw.chat_model import MetaClawChatModel
    from langchain_metaclaw.schedule import MadMaxScheduler, TrainingSession
    from langchain_metaclaw.store.trace_store import TraceStore
    from langchain_metaclaw.training.trainer import Trainer

Measurement = dict[str, tuple[float, float, float]]


def _routing_tool(name: str, description: str, answer: Callable[[str], str]) -> BaseTool:
    """One of the task's tools (its name and argument come from ``tasks.TOOLS``), answering directly.

    The task is routing: one call per request, and the tool's answer is the agent's answer
    (``return_direct``). An agent that called the model again after the result would ask a 135M policy for a
    turn its training never showed it: trained on first turns only, the demo's agent called its tool again
    after every result until the recursion limit, on all 19 held-out requests (measured).
    """
    argument = TASK_TOOLS[name][0]
    return StructuredTool.from_function(
        lambda **kwargs: answer(kwargs[argument]), name=name, description=description, return_direct=True,
        args_schema=create_model(name, __doc__=description, **{argument: (str, ...)}),
    )


TOOLS = [
    _routing_tool("get_weather", "Current weather in a city.", lambda city: f"It is sunny and 21 C in {city}."),
    _routing_tool("get_time", "Local time in a city.", lambda city: f"It is 14:05 in {city}."),
    _routing_tool("find_recipe", "A recipe for a dish.",
                  lambda dish: f"{dish.title()}: mix, cook for 20 minutes, serve."),
    _routing_tool("translate", "Translate English text into French.", lambda text: f"(French) {text}"),
]


@dataclass
class DemoReport:
    before: Measurement = field(default_factory=dict)
    after: Measurement = field(default_factory=dict)
    served_during_training: int = 0
    failed_during_training: int = 0
    versions_seen: set[str] = field(default_factory=set)
    train_status: str = ""
    plot: Path | None = None


@dataclass
class _Demo:
    """What the demo's steps share: where it writes, what it serves, and what it has measured so far."""

    console: Any
    home: Path
    store: TraceStore
    task: ToolCallFormatTask
    llm: MetaClawChatModel
    """The serving model (sampled at temperature 1: the captured turns are the trainer's samples)."""
    greedy_llm: MetaClawChatModel
    """The measuring model: greedy, on the same engine and registry as ``llm``."""
    agent: Any
    eval_agent: Any
    handler: Any
    report: DemoReport = field(default_factory=DemoReport)

    def ask(self, prompt: TaskPrompt, thread_id: str) -> Any:
        """Serve one request through the serving agent, captured."""
        messages = [HumanMessage(prompt.messages[-1]["content"])]
        return self.agent.invoke({"messages": messages}, config={
            "callbacks": [self.handler], "recursion_limit": 6, "configurable": {"thread_id": thread_id}})


def _answer_text(message: Any) -> str:
    """An AI message as the text the task scores: its first tool call written as the JSON the task asks for."""
    import json

    if message.tool_calls:
        call = message.tool_calls[0]
        return json.dumps({"name": call["name"], "arguments": call["args"]})
    return str(message.content)


def run_demo(*, train_minutes: float = 8.0, home: Path | None = None, console: Any = None,
             max_steps: int = 200, prompts: int | None = None) -> DemoReport:
    """Run the demo; returns what it measured.

    Args:
        train_minutes: how long the simulated idle window stays open (training stops at the next step).
        home: where the demo's store and plot go (default ``$METACLAW_HOME/demo``, recreated every run).
        console: a ``rich`` console (default: stdout).
        max_steps: training steps at most (the window usually closes first).
        prompts: use only the first N training and held-out prompts (a quick smoke run).
    """
    demo = _open(home, console, prompts)
    _serve_and_capture(demo)
    scored = demo.task.score_turns(demo.store)
    demo.console.print(f"2/5 scored {scored} captured turns with the task's programmatic reward")
    demo.report.before = _measure(demo, "before")
    rewards = _train_while_serving(demo, train_minutes, max_steps)
    demo.report.after = _measure(demo, "after")
    demo.handler.close()
    _show_result(demo, rewards)
    demo.llm.close()
    demo.greedy_llm.close()
    return demo.report


def _open(home: Path | None, console: Any, prompts: int | None) -> _Demo:
    """A fresh store under ``home``, the task, and the serving and measuring agents."""
    from langchain.agents import create_agent
    from rich.console import Console

    from langchain_metaclaw.capture import MetaClawCallbackHandler
    from langchain_metaclaw.chat_model import MetaClawChatModel
    from langchain_metaclaw.config import metaclaw_home
    from langchain_metaclaw.store import TraceStore

    console = console or Console()
    home = home or metaclaw_home() / "demo"
    home.mkdir(parents=True, exist_ok=True)
    db = home / "demo.db"
    for stale in home.glob("demo.db*"):
        stale.unlink()
    store = TraceStore(f"sqlite:///{db}")
    task = ToolCallFormatTask()
    if prompts is not None:
        task.train, task.held_out = task.train[:prompts], task.held_out[:prompts]
    console.rule("[bold]langchain-metaclaw demo[/bold]: SmolLM2-135M + SQLite + local LoRA trainer, offline")
    console.print(f"store: {db}")
    llm = MetaClawChatModel(store=store, temperature=1.0, max_tokens=48, seed=0)
    greedy_llm = MetaClawChatModel(store=store, temperature=0.0, max_tokens=48)  # same engine, same registry
    return _Demo(console=console, home=home, store=store, task=task, llm=llm, greedy_llm=greedy_llm,
                 agent=create_agent(llm, TOOLS, system_prompt=SYSTEM),
                 eval_agent=create_agent(greedy_llm, TOOLS, system_prompt=SYSTEM),
                 handler=MetaClawCallbackHandler(store))


def _serve_and_capture(demo: _Demo) -> None:
    """Step 1: the agent serves every training request, with capture on."""
    from rich.progress import Progress

    with Progress(console=demo.console) as progress:
        bar = progress.add_task("1/5 agent serves requests (captured)", total=len(demo.task.train))
        for i, prompt in enumerate(demo.task.train):
            try:
                demo.ask(prompt, f"user-{i}")
            except Exception as exc:  # a 135M agent may loop; the turns it made are still captured
                demo.console.print(f"  request {i}: {type(exc).__name__}")
            progress.advance(bar)
    demo.handler.flush()


def _measure(demo: _Demo, label: str) -> Measurement:
    """Greedy held-out reward (mean and 95% interval) of the agent as it serves now."""
    from rich.progress import Progress

    task, console = demo.task, demo.console
    demo.greedy_llm.refresh()
    greedy, answers, unfinished = [], Counter(), 0
    with Progress(console=console) as progress:
        bar = progress.add_task(f"measure the agent on {len(task.held_out)} held-out prompts ({label})",
                                total=len(task.held_out))
        for prompt in task.held_out:
            try:
                result = demo.eval_agent.invoke({"messages": [HumanMessage(prompt.messages[-1]["content"])]},
                                                config={"recursion_limit": 6})
                first = next(m for m in result["messages"] if m.type == "ai")
                answer = _answer_text(first)
                answers[answer] += 1
                greedy.append(task.reward(prompt.messages, answer) or 0.0)
                demo.report.versions_seen.add(str(first.response_metadata.get("adapter_version")))
            except Exception:  # e.g. an agent that calls its tool again and again: a failed request
                greedy.append(0.0)
                unfinished += 1
            progress.advance(bar)
    if unfinished:
        console.print(f"    {unfinished} of {len(task.held_out)} held-out requests did not finish (scored 0)")
    if answers:  # a policy that gives one answer to every request reads none of them
        top, count = answers.most_common(1)[0]
        console.print(f"    {len(answers)} distinct first answers for {sum(answers.values())} requests; "
                      f"most common ({count}x): {top[:100]!r}")
    return {"greedy": mean_ci95(greedy)}


def _train_while_serving(demo: _Demo, train_minutes: float, max_steps: int) -> list[float]:
    """Steps 3-4: MadMax sees a (simulated) idle keyboard, opens a window and trains while the agent keeps
    serving; then the (simulated) user comes back and the window closes at the next step boundary.
    Returns the on-policy group reward of each training step."""
    idle = {"seconds": 0.0}
    trainers: list[Trainer] = []
    madmax = _madmax(demo, idle, trainers, max_steps)
    serving_done = threading.Event()
    server = threading.Thread(target=_keep_serving, args=(demo, serving_done), daemon=True)
    madmax.start()
    server.start()
    idle["seconds"] = 20 * 60.0
    demo.console.print("[yellow]3/5 [SIMULATED] keyboard idle for 20 min: MadMax opens a training window[/yellow]")
    session = _train_until_the_user_returns(demo, madmax, idle, trainers, train_minutes)
    rewards = _group_rewards(trainers)
    run = session.result if session is not None else None
    report = demo.report
    report.train_status = f"{run.status}: {run.reason}" if run is not None else "no training session ran"
    demo.console.print(f"    train run {report.train_status} ({run.steps if run else 0} steps)")
    demo.llm.refresh()
    serving_done.set()
    server.join(30)
    demo.console.print(f"    agent kept serving during training: {report.served_during_training} requests, "
                       f"{report.failed_during_training} failed; now serving {demo.llm.serving_version or 'base'}")
    return rewards


def _madmax(demo: _Demo, idle: dict[str, float], trainers: list[Trainer], max_steps: int) -> MadMaxScheduler:
    """The real scheduler, fed the simulated idle signal; each session's trainer is kept in ``trainers``."""
    from langchain_metaclaw.schedule import MadMaxScheduler, WindowPolicy, WindowSignals
    from langchain_metaclaw.training.trainer import Trainer, TrainerConfig

    # One torch thread: the trainer gets one core and the agent, still serving, the other.
    cfg = TrainerConfig(group_size=8, group_prompts=4, learning_rate=2e-4, max_new_tokens=32, eval_prompts=8,
                        max_steps=max_steps, temperature=1.0, threads=1, low_priority=False)

    def new_trainer() -> Trainer:
        trainers.append(Trainer(demo.store, cfg, reward_fn=demo.task.reward))
        return trainers[-1]

    return MadMaxScheduler(
        demo.store,
        WindowPolicy(idle_minutes=10),
        trainer_factory=new_trainer,
        score_fn=demo.task.score_turns,  # what the agent served since the last window gets scored first
        signals=lambda now: WindowSignals(idle_seconds=idle["seconds"]),
        check_interval=1.0,
        session_cooldown=None,
    )


def _keep_serving(demo: _Demo, done: threading.Event) -> None:
    """The agent's traffic during training: a request every 5 s, counted as served or failed."""
    i = 0
    while not done.is_set():
        prompt = demo.task.train[i % len(demo.task.train)]
        try:
            demo.ask(prompt, f"live-{i}")
            demo.report.served_during_training += 1
        except Exception:
            demo.report.failed_during_training += 1
        i += 1
        done.wait(5.0)


def _group_rewards(trainers: list[Trainer]) -> list[float]:
    history = trainers[-1].history if trainers else []
    return [m["group_reward:mean"] for m in history if "group_reward:mean" in m]


def _train_until_the_user_returns(demo: _Demo, madmax: MadMaxScheduler, idle: dict[str, float],
                                  trainers: list[Trainer], train_minutes: float) -> TrainingSession | None:
    """Show training progress until the window's time is up or its session ends; then the simulated user
    comes back and MadMax stops. Returns the last session."""
    from rich.progress import Progress

    with Progress(console=demo.console) as progress:
        bar = progress.add_task("4/5 training (local LoRA, CPU)", total=None)
        deadline = time.monotonic() + train_minutes * 60
        while time.monotonic() < deadline and not (madmax.last_session and not madmax.last_session.running):
            if rewards := _group_rewards(trainers):
                progress.update(bar, description=f"4/5 training: step {len(rewards)}, group reward {rewards[-1]:.2f}")
            time.sleep(1.0)
        idle["seconds"] = 0.0
        demo.console.print("[yellow]    [SIMULATED] the user is back: MadMax closes the window[/yellow]")
        madmax.tick()  # the watchdog's check, now rather than within check_interval
        return madmax.stop()


def _show_result(demo: _Demo, rewards: list[float]) -> None:
    """Step 5's verdict: held-out reward before and after, the plot, and ``metaclaw status``."""
    from langchain_metaclaw.status import collect_status, render_status

    console = demo.console
    b, a = demo.report.before["greedy"], demo.report.after["greedy"]
    console.rule("result")
    console.print(f"held-out reward (greedy): before {b[0]:.2f} [{b[1]:.2f}, {b[2]:.2f}] -> "
                  f"after {a[0]:.2f} [{a[1]:.2f}, {a[2]:.2f}]  ({a[0] - b[0]:+.2f})")
    demo.report.plot = _plot(rewards, demo.home / "reward.png", b[0], a[0])
    console.print(f"plot of reward over training steps: {demo.report.plot}")
    render_status(collect_status(demo.store), console)


def _plot(rewards: list[float], path: Path, before: float, after: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(rewards) + 1), rewards, marker="o", label="on-policy group reward (train prompts)")
    ax.axhline(before, color="grey", linestyle="--", label=f"held-out before ({before:.2f})")
    ax.axhline(after, color="green", linestyle="--", label=f"held-out after ({after:.2f})")
    ax.set_xlabel("training step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("SmolLM2-135M learns the tool-call format (local LoRA, CPU)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":  # pragma: no cover
    run_demo()
