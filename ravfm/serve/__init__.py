"""`ravfm serve`: online predictions from a checkpoint on Ray Serve.

rows.py turns a JSON request into shard rows (no Ray, no torch); model.py holds one loaded
checkpoint and predicts (no Ray); app.py is the Serve deployment (HTTP routes, dynamic
batching, rollout through user_config); deploy.py starts, reloads, watches and stops it.
"""
