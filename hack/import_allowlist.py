"""An import-linter contract type: a package imports only the third-party packages listed.

import-linter's own contracts forbid what is named; an allow-list ("cluo_host may use
dbus_fast and systemd, nothing else") cannot be written with them. `lint-imports` loads
this module from the repository root (it puts the working directory on sys.path), see
`.importlinter`:

    contract_types =
        allowed_external: hack.import_allowlist.AllowedExternalContract

    [importlinter:contract:agent-third-party]
    type = allowed_external
    source_modules = cluo_host
    allowed_modules = dbus_fast systemd

The standard library and the graph's own root packages are always allowed (the other
contracts say which first-party imports are allowed).
"""

from __future__ import annotations

import sys
from typing import Any

from grimp import ImportGraph
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


class AllowedExternalContract(Contract):
    """Every module in ``source_modules`` imports, beyond the standard library and the
    project's own packages, only ``allowed_modules`` (top-level package names)."""

    type_name = "allowed_external"

    source_modules = fields.ListField(subfield=fields.ModuleField())
    allowed_modules = fields.ListField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        allowed = set(self.allowed_modules) | set(sys.stdlib_module_names)
        own = {str(root) for root in self.session_options["root_packages"]}
        refused: list[dict[str, Any]] = []
        for source in self.source_modules:
            modules = {source.name} | graph.find_descendants(source.name)
            for module in sorted(modules):
                for imported in sorted(graph.find_modules_directly_imported_by(module)):
                    top = imported.split(".")[0]
                    if top in allowed or top in own:
                        continue
                    lines = graph.get_import_details(importer=module, imported=imported)
                    refused.append({
                        "importer": module,
                        "imported": imported,
                        "lines": [detail["line_number"] for detail in lines],
                    })
        return ContractCheck(kept=not refused, metadata={"refused": refused})

    def render_broken_contract(self, check: ContractCheck) -> None:
        allowed = ", ".join(self.allowed_modules) or "none"
        for item in check.metadata["refused"]:
            lines = ", ".join(f"l.{n}" for n in item["lines"])
            output.print_error(
                f"{item['importer']} imports {item['imported']} ({lines}): not the standard "
                f"library, a project package or an allowed one ({allowed})",
                bold=False,
            )
            output.new_line()
