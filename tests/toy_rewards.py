"""Rewards a tiny random model can climb, registered on import (also in a CLI the tests start:
`python -c "import toy_rewards; ..."`)."""
from alignflow.trainers.rewards import register_reward


@register_reward("digit_share")
def digit_share(prompts, completions, **_):
    """The share of digits in a reply."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]
