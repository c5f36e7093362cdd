"""Counterfactual sessions: which words carry an answer's value, and swapping them."""

from __future__ import annotations

from assistant.sleep import counterfactual

SESSION = "My sister is called Zara. I live in Porto.\nMy favourite flower is jasmine."
OTHERS = ["My brother is called Tom and he lives in Lima.", "I work as a baker."]


def test_the_value_is_what_the_answer_shares_with_its_session_alone():
    assert counterfactual.values("Your sister is called Zara.", "What is my sister's name?", SESSION, OTHERS) == ["Zara"]
    assert counterfactual.values("You live in Porto.", "Where do I live?", SESSION, OTHERS) == ["Porto"]
    assert counterfactual.values("Your favourite flower is jasmine.", "Which flower do I like most?",
                                 SESSION, OTHERS) == ["favourite", "jasmine"]


def test_words_the_question_asks_or_other_sessions_say_are_no_value():
    assert counterfactual.values("Zara lives in Porto.", "Where does Zara live?", SESSION, OTHERS) == ["Porto"]
    assert counterfactual.values("Your sister is called Zara.", "Who is my sister?", SESSION,
                                 OTHERS + ["Zara called."]) == []
    assert counterfactual.values("I do not know.", "Where is Tom?", SESSION, OTHERS) == []


def test_whole_words_only_case_insensitive():
    assert counterfactual.mentions("Zara's home", "Zara")
    assert not counterfactual.mentions("Zara'x", "Zara") and not counterfactual.mentions("Zara-Lee", "Zara")
    assert counterfactual.mentions("I met ZARA today.", "zara")
    assert not counterfactual.mentions("Zarathustra spoke.", "Zara")


def test_a_swap_replaces_every_mention_and_nothing_else():
    context = [{"role": "user", "content": "Zara is my sister. Zara's job? My sister is called Zara, not Zarah."},
               {"role": "assistant", "content": "Noted."}]
    swapped = counterfactual.swap(context, "Zara", "Mia")
    assert swapped == [{"role": "user", "content": "Mia is my sister. Mia's job? My sister is called Mia, not Zarah."},
                       {"role": "assistant", "content": "Noted."}]
    assert context[0]["content"].startswith("Zara")  # the original is untouched
    assert counterfactual.swap([{"role": "user", "content": "Jasmine is best. I like jasmine."}], "jasmine",
                               "ramen")[0]["content"] == "Ramen is best. I like ramen."
