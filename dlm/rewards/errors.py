"""The error a reward raises when its configuration or a user's reward function is at fault."""

from __future__ import annotations

from dlm.errors import UserError


class RewardError(UserError):
    """A reward or prompt source is misconfigured (bad import path, wrong return type, unknown dataset field):
    the message names the field and the valid form."""
