"""Agents that play MedEyesEnv: the expert (GRN + CVS over a region oracle) and VLM policies."""

from medeyes.agents.base import Agent, EpisodeContext, TurnOutput

__all__ = ["Agent", "EpisodeContext", "TurnOutput"]
