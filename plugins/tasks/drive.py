"""Keep a car in its lane along a road of T bends: the imitation-learning driving example of Ross & Bagnell in
miniature, with an environment the learner cannot write for itself.

The prompt is the road, one bend per step: "road: <||><|> =" ('<' left, '|' straight, '>' right). The response
alternates the driver's action and the environment's observation: "L4S4S4R4L4S4", where the action is 'L', 'S' or
'R' (steer left, straight, right) and the observation is the car's offset from the lane's centre after that step,
one digit from '0' (4 left of centre) to '8' (4 right; '4' is the centre). The offset moves by action minus bend,
x' = clip(x + a - d, -4, 4): steering with the road keeps it, steering against it drifts.

The expert steers back to the centre from any state, a = clip(d - x, -1, 1): on its own road it copies the bends
and always observes '4'. After a learner's mistake the car is off-centre, and the expert's next actions correct
the drift. The observation is the environment's (`environment`), forced into every imitation rollout and
evaluation, so that a learner cannot "write itself back" to the centre, only steer there; the true offset is
always recomputed from the actions in the response, whatever the observation characters say.

Gold: the share of steps that end in the centre. Exact match (gold 1.0) means the car never left it.
"""

from __future__ import annotations

import random

from framework.interfaces import Task
from framework.records import Prompt

BENDS = {"<": -1, "|": 0, ">": 1}
ACTIONS = {"L": -1, "S": 0, "R": 1}
STEER = {v: k for k, v in ACTIONS.items()}
EDGE = 4


class DriveLane(Task):
    """`length` bends (the horizon T: 2T response tokens); `bend_rate`: the share of bends that are not straight."""

    def __init__(self, length: int = 16, bend_rate: float = 0.5):
        if length < 1 or not 0.0 <= bend_rate <= 1.0:
            raise ValueError("task.length must be >= 1 and task.bend_rate in [0, 1]")
        self.length, self.bend_rate = length, bend_rate
        self.name = f"drive{length}"

    def prompts(self, n: int, seed: int) -> list[Prompt]:
        rng = random.Random(f"{self.name}:{self.bend_rate}:{seed}")
        out = []
        for i in range(n):
            road = "".join(rng.choice("<>") if rng.random() < self.bend_rate else "|" for _ in range(self.length))
            out.append(Prompt(f"road: {road} =", meta={"road": road}, source=f"{self.name}:{seed}:{i}"))
        return out

    def road(self, prompt: Prompt) -> list[int]:
        text = prompt.meta.get("road") or prompt.text.split("=")[0].removeprefix("road:")
        return [BENDS[c] for c in text if c in BENDS]

    def offsets(self, prompt: Prompt, response: str) -> tuple[list[int], int]:
        """The offset after each step the response has acted (its action characters are at even positions; any
        character there other than 'L' or 'R' steers straight), and the number of characters of the response that
        are a whole number of (action, observation) steps or an action awaiting its observation."""
        road, x, out = self.road(prompt), 0, []
        for t, c in enumerate(response[0 : 2 * len(road) : 2]):
            x = max(-EDGE, min(EDGE, x + ACTIONS.get(c, 0) - road[t]))
            out.append(x)
        return out, min(len(response), 2 * len(road))

    def environment(self, prompt: Prompt, prefix: str) -> str:
        offsets, used = self.offsets(prompt, prefix)
        if used % 2 == 1 and len(prefix) == used:  # an action has just been taken: the car's new offset
            return str(offsets[-1] + EDGE)
        return ""

    def expert_continuation(self, prompt: Prompt, prefix: str) -> str:
        road = self.road(prompt)
        offsets, used = self.offsets(prompt, prefix)
        if len(prefix) > used:  # past the last step: stop
            return ""
        out, x = [], offsets[-1] if offsets else 0
        if used % 2 == 1:
            out.append(str(x + EDGE))
        for d in road[len(offsets):]:
            a = max(-1, min(1, d - x))
            x = max(-EDGE, min(EDGE, x + a - d))
            out += [STEER[a], str(x + EDGE)]
        return "".join(out)

    def gold(self, prompt: Prompt, completion: str) -> float:
        offsets, _ = self.offsets(prompt, completion)
        road = self.road(prompt)
        return sum(x == 0 for x in offsets) / len(road) if road else 0.0
