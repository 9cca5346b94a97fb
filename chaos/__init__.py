"""Chaos Mesh manifests and the fault runner: python -m chaos.inject --plan chaos/plan-example.yaml"""
