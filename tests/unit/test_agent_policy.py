"""deploy/agent-policy.yaml lets a node change exactly the keys cluo/protocol.py says the
agent writes, under both protocol prefixes: the two cannot drift apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import yaml

from cluo.protocol import CLUO_PREFIX, FLUO_PREFIX, PAUSED_ANNOTATION, SPECS, Kind, Writer

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def policy() -> dict[str, Any]:
    documents = list(yaml.safe_load_all((DEPLOY / "agent-policy.yaml").read_text()))
    found: list[dict[str, Any]] = [
        d for d in documents if d["kind"] == "ValidatingAdmissionPolicy"]
    assert len(found) == 1
    return found[0]


def variable(name: str) -> Any:
    """A variable whose CEL expression is a literal (a string or a list of strings)."""
    (expression,) = [v["expression"] for v in policy()["spec"]["variables"]
                     if v["name"] == name]
    return ast.literal_eval(expression)


def agents(kind: Kind) -> set[str]:
    return {spec.name for spec in SPECS if spec.kind is kind and spec.writer is Writer.AGENT}


def test_the_annotations_a_node_may_change_are_the_agents() -> None:
    assert set(variable("agentAnnotations")) == agents(Kind.ANNOTATION)


def test_the_labels_a_node_may_change_are_the_agents() -> None:
    assert set(variable("agentLabels")) == agents(Kind.LABEL)


def test_both_protocol_prefixes_and_cluos_own_are_guarded() -> None:
    assert set(variable("protocolPrefixes")) == {CLUO_PREFIX, FLUO_PREFIX}
    assert PAUSED_ANNOTATION.startswith(variable("cluoPrefix"))


def test_no_hook_annotation_is_listed_by_default() -> None:
    assert variable("hookAnnotations") == []


def test_the_policy_is_bound_and_applied_with_deploy() -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "agent-policy.yaml").read_text()))
    (binding,) = [d for d in documents if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert binding["spec"]["policyName"] == policy()["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert "agent-policy.yaml" in kustomization["resources"]
    assert "agent-rbac.yaml" not in kustomization["resources"]


def test_the_hook_patch_in_docs_security_replaces_the_hook_variable() -> None:
    """docs/security.md shows a JSON patch by index: it must name hookAnnotations."""
    text = (DEPLOY.parent / "docs" / "security.md").read_text()
    (index,) = re.findall(r"path: /spec/variables/(\d+)/expression", text)
    assert policy()["spec"]["variables"][int(index)]["name"] == "hookAnnotations"
