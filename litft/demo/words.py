"""The word lists both the pretraining corpus and the task data draw from.

Plain data, lower case. The base model sees every word here many times during pretraining, so the
fine-tuning task only has to teach a *skill*, never new vocabulary.
"""
from __future__ import annotations

NAMES: tuple[str, ...] = (
    "Anna", "Ben", "Cara", "Dan", "Eva", "Finn", "Gina", "Hugo", "Ida", "Jack", "Kate", "Leo", "Mia", "Nick",
    "Olga", "Paul", "Rosa", "Sam", "Tina", "Tom", "Uma", "Vera", "Will", "Zoe",
)

ANIMALS: tuple[str, ...] = (
    "cat", "dog", "fox", "cow", "pig", "hen", "owl", "bee", "ant", "bat", "rat", "elk", "yak", "emu", "ape",
    "bird", "fish", "frog", "goat", "duck", "bear", "lion", "wolf", "deer", "seal", "crab", "mole", "moth",
    "swan", "toad", "hare", "lamb", "mule", "worm", "snail", "horse", "mouse", "sheep", "tiger", "zebra",
    "whale", "camel", "eagle", "goose", "otter", "panda", "shark", "snake", "llama", "koala", "rabbit",
    "monkey", "turtle", "parrot", "donkey", "beaver", "spider", "pigeon", "salmon", "badger",
)

FOODS: tuple[str, ...] = (
    "apple", "bread", "cake", "rice", "soup", "milk", "egg", "pear", "plum", "fig", "corn", "bean", "nut",
    "jam", "pie", "bun", "lime", "kiwi", "melon", "lemon", "grape", "peach", "mango", "honey", "cheese",
    "butter", "carrot", "potato", "tomato", "onion", "pepper", "cherry", "banana", "cookie", "pasta", "salad",
    "olive", "berry", "sugar", "salt", "flour", "oat", "toast", "bacon", "pizza", "muffin", "noodle",
)

THINGS: tuple[str, ...] = (
    "box", "cup", "hat", "pen", "key", "bag", "bed", "car", "bus", "map", "cap", "jar", "pot", "fan", "rug",
    "lamp", "book", "ball", "door", "desk", "sock", "shoe", "coat", "ring", "bell", "boat", "kite", "drum",
    "fork", "bowl", "rope", "sail", "coin", "card", "vase", "chair", "table", "clock", "phone", "glass",
    "plate", "spoon", "knife", "brush", "shirt", "towel", "bottle", "basket", "candle", "pillow", "mirror",
    "window", "button", "ladder", "hammer", "wallet", "bucket", "blanket", "guitar", "pencil", "paper",
)

PLACES: tuple[str, ...] = (
    "park", "farm", "shop", "lake", "hill", "town", "city", "road", "beach", "river", "forest", "garden",
    "school", "market", "field", "house", "kitchen", "island", "valley", "bridge", "village", "castle",
    "library", "station", "harbor", "museum", "cave", "desert", "meadow", "street",
)

COLORS: tuple[str, ...] = (
    "red", "blue", "green", "black", "white", "pink", "gray", "brown", "gold", "yellow", "purple", "orange",
    "silver",
)

ADJECTIVES: tuple[str, ...] = (
    "big", "small", "old", "new", "hot", "cold", "fast", "slow", "soft", "hard", "wet", "dry", "tall",
    "short", "long", "happy", "sad", "quiet", "loud", "warm", "cool", "clean", "dirty", "heavy", "light",
    "bright", "dark", "sweet", "sour", "fresh", "tiny", "huge", "brave", "calm", "kind", "lazy", "busy",
    "funny", "strong", "gentle", "shiny", "round", "empty", "full", "young", "smart", "quick", "proud",
)

VERBS: tuple[tuple[str, str], ...] = (  # (present 3rd person, past)
    ("sees", "saw"), ("finds", "found"), ("likes", "liked"), ("wants", "wanted"), ("takes", "took"),
    ("gives", "gave"), ("makes", "made"), ("keeps", "kept"), ("holds", "held"), ("buys", "bought"),
    ("sells", "sold"), ("draws", "drew"), ("paints", "painted"), ("cleans", "cleaned"), ("moves", "moved"),
    ("carries", "carried"), ("opens", "opened"), ("brings", "brought"), ("picks", "picked"),
    ("washes", "washed"), ("counts", "counted"), ("watches", "watched"), ("loves", "loved"),
    ("hides", "hid"), ("drops", "dropped"), ("needs", "needed"), ("shows", "showed"), ("names", "named"),
)

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
)

# The word categories: what the demo task asks about. The corpus states them ("A fox is an animal.") and
# uses each word in category-typical sentences; fine-tuning teaches the model to *answer* with them.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ANIMALS, "food": FOODS, "object": THINGS, "place": PLACES, "color": COLORS,
}
TASK_WORDS: tuple[str, ...] = tuple(w for words in CATEGORIES.values() for w in words)
assert len(set(TASK_WORDS)) == len(TASK_WORDS), "a word may belong to one category only"
