"""A tour of MedEyesEnv: reset, scan, drill, a malformed turn, then the gold answer; prints what comes back."""

import json

import gymnasium as gym

import medeyes_env  # noqa: F401  (registers the MedEyes/* ids)


def turn(reasoning: str, action: dict) -> str:
    """One protocol turn with a JSON action."""
    return f"<reasoning>{reasoning}</reasoning><action>{json.dumps(action)}</action>"


env = gym.make("MedEyes/Phantom-v0", split="test")
obs, info = env.reset(seed=0)
case = env.unwrapped.case
print("info:", info)
print("obs image:", obs["image"].shape, obs["image"].dtype)
print("obs text:\n" + obs["text"])
print("gold:", case.answer, [r.box for r in case.regions])
box = [round(v) for v in case.regions[0].box] if case.regions else [400, 400, 600, 600]
for text in [
    turn("compare two zones", {"name": "scan", "boxes": [[100, 200, 400, 500], [600, 200, 900, 500]]}),
    turn("closer look", {"name": "drill", "box": box}),
    '{"name": "drill"}',  # malformed: no tags
    f"<reasoning>decided</reasoning><answer>{case.answer}</answer>",
]:
    obs, reward, terminated, truncated, info = env.step(text)
    print(reward, terminated, truncated, obs["text"])
print({k: round(v, 3) for k, v in info["reward_components"].items()})
