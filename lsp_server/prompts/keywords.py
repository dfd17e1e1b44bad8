"""Words a hover does not explain: the language's own keywords (pure).

A hover request comes whenever the pointer rests; on `def`, `return` or `if` it would run the
model for an answer the user never wanted. Only reserved words are here (a builtin such as
`print` or `len` may well be worth a hover), by the editor's language id.
"""

from __future__ import annotations

import keyword

_C = "auto break case char const continue default do double else enum extern float for goto if inline int long register return short signed sizeof static struct switch typedef union unsigned void volatile while"
_JS = "async await break case catch class const continue debugger default delete do else export extends false finally for function if import in instanceof let new null of return static super switch this throw true try typeof undefined var void while with yield"
_TS = _JS + " abstract any as boolean declare enum implements interface keyof namespace never number private protected public readonly string type unknown"

_KEYWORDS = {
    "python": " ".join(keyword.kwlist + keyword.softkwlist + ["self", "cls"]),
    "c": _C,
    "cpp": _C + " bool catch class constexpr delete false friend namespace new nullptr operator private protected public template this throw true try typename using virtual",
    "javascript": _JS,
    "javascriptreact": _JS,
    "typescript": _TS,
    "typescriptreact": _TS,
    "go": "break case chan const continue default defer else fallthrough for func go goto if import interface map package range return select struct switch type var nil true false",
    "rust": "as async await break const continue crate dyn else enum extern false fn for if impl in let loop match mod move mut pub ref return self Self static struct super trait true type unsafe use where while",
    "java": "abstract assert boolean break byte case catch char class const continue default do double else enum extends final finally float for if implements import instanceof int interface long native new null package private protected public return short static super switch synchronized this throw throws true false try void volatile while var",
    "csharp": "abstract as base bool break case catch char class const continue decimal default do double else enum event explicit false finally float for foreach if implicit in int interface internal is lock long namespace new null object out override private protected public readonly ref return sealed short static string struct switch this throw true try typeof uint ulong using var virtual void while",
    "ruby": "alias and begin break case class def do else elsif end ensure false for if in module next nil not or redo rescue retry return self super then true undef unless until when while yield",
    "lua": "and break do else elseif end false for function goto if in local nil not or repeat return then true until while",
    "php": "abstract and as break case catch class const continue default do echo else elseif extends false final for foreach function if implements interface namespace new null private protected public return static switch this throw true try use var while",
    "shellscript": "case do done elif else esac fi for function if in select then until while",
}
_SETS = {language: frozenset(words.split()) for language, words in _KEYWORDS.items()}


def is_keyword(word: str, language: str) -> bool:
    return word in _SETS.get(language, ())
