"""kugetsu's pure core: no I/O, no Flask, no subprocess, no sqlite.

Each module is plain functions and values, tested as such:

- `tasks`: states, outcomes, kinds, the allowed transitions, `Task`, the retry policy and
  the one result of an attempt;
- `permissions`: the one order of Gitea permissions, and what a request shows of its
  requester's;
- `names`: Gitea's rules for owner, repository and user names, and for numbers;
- `events`: a webhook delivery verified and parsed into an event;
- `markdown`: which lines of a comment a reader sees as plain text;
- `commands`: the registry of slash commands, and reading one from a comment;
- `outbox`: the kinds of work for Gitea that intake leaves for the worker, and its row;
- `intake`: from an event to what kugetsu will do (`decide`);
- `render`: everything kugetsu says on Gitea, and every `<!-- kugetsu ... -->` marker;
- `health`: what /healthz reports, from facts gathered elsewhere.
"""
