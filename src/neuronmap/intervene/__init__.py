"""Stage 7, interventions: measuring what a neuron does when its activation is set.

Owns clamping and generation with their measured effects (effects), verifying a concept's candidate neurons
(verify) and the prompts that elicit a concept (elicit).

May import: every stage below (core .. evidence).
"""
