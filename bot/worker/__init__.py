"""The worker process's work: the tick and the attempts it starts.

- `tick`: the `Worker`, its tick and steps (recover, authorize, launch, outbox, comments)
  and `finish()`, where every attempt ends;
- `runner`: one attempt, from the worktree to its `AttemptResult`; the agent's process
  is started through the worker's `Sandbox` (bot/sandbox.py), which lends it the worktree
  and home and ends everything it started;
- `outbox`: the outbox pass, one handler per `OutboxKind`;
- `auth`: who may ask for work, asked of Gitea and cached.
"""
