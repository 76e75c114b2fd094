"""The rollout controller: canary, staged waves, health gates, automatic rollback.

``controller.RolloutController`` (state machine), ``gates`` (pure gate evaluation), ``health``
(telemetry samples and windowed aggregates), ``publisher`` (retained assignments), ``cli``.
Nothing is imported here: ``cli`` is loaded by ``edgefed`` and must stay free of sqlalchemy.
"""
