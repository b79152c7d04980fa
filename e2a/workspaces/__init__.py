"""Persistent workspaces: a scope's /home/user, kept in S3 and mounted into its sandboxes by
rclone (docs/workspaces.md).

* scope.py   — the names that choose a workspace, checked;
* registry.py — workspace rows: find or make one per scope, usage, last use;
* s3.py      — the S3 store (boto3): listings, usage, deletes, presigned URLs, and the settings
               an rclone mount needs;
* server.py  — the embedded S3 server e2a starts when no S3 is configured;
* mount.py   — one rclone FUSE mount per sandbox, flushed before the sandbox is destroyed.
"""
