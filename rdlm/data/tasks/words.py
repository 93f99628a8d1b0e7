"""Fictional vocabulary shared by the two logic tasks (ProsQA, ProntoQA): entities, properties and
short pronounceable made-up concept names."""

_ONSETS = "b d f g k l m n p r s t v w z".split()
_VOWELS = "a e i o u".split()
_CODAS = "b d g k l m n p r s t x".split()
ENTITIES = ("alex", "ann", "bob", "eva", "kim", "leo", "max", "mia", "rex", "sam", "tom", "zoe")
PROPERTIES = ("red", "blue", "hot", "cold", "sour", "sweet", "shy", "loud", "dull", "bright",
              "small", "large", "wet", "dry", "fast", "slow")
# Three-letter concept names keep sequences short for character-level models; words of the
# question's own grammar, entities and properties are excluded so that parsing stays unambiguous.
_RESERVED = set(ENTITIES) | set(PROPERTIES) | {"not", "is", "a", "or", "every", "true", "false"}
CONCEPTS = sorted({o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS} - _RESERVED)

# The surface form of the ProsQA paper's files: capitalised names and made-up "-pus" concepts
# ("Every wumpus is a yumpus.", "Is Sally a hilpus or sterpus?").
PAPER_ENTITIES = ("Alex", "Bob", "Fae", "Jack", "Max", "Polly", "Rex", "Sally", "Sam", "Stella",
                  "Tom", "Wren")
PAPER_CONCEPTS = sorted(o + v + m + "pus" for o in "b br d f g gr h j k l n r sh st t tr w y z"
                        .split() for v in "aeiou" for m in "lmnr")
