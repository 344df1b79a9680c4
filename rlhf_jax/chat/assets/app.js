"use strict";
// Every user and model text goes on the page with textContent, never as HTML.
const STRINGS = {
  en: {title: "Chat", language: "Language", newConversation: "New conversation",
       placeholder: "Say something", send: "Send", like: "Like", dislike: "Dislike",
       thinking: "…", thanks: "Thanks for the feedback."},
  zh: {title: "聊天", language: "语言", newConversation: "新对话", placeholder: "说点什么",
       send: "发送", like: "赞", dislike: "踩", thinking: "…", thanks: "谢谢你的反馈。"},
};
let lang = "en";
let conversationId = null;
const $ = (id) => document.getElementById(id);
const t = (key) => STRINGS[lang][key];

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function applyLanguage() {
  document.documentElement.lang = lang;
  $("title").textContent = t("title");
  $("lang-label").textContent = t("language");
  $("new").textContent = t("newConversation");
  $("message").placeholder = t("placeholder");
  $("send").textContent = t("send");
  for (const b of document.querySelectorAll("button.rate")) b.textContent = t(b.dataset.label);
}

function bubble(classes, text) {
  const div = document.createElement("div");
  div.className = "msg " + classes;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("log").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

async function postJson(path, payload) {
  const response = await fetch(path, {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(payload)});
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) throw new Error((data && data.error) || ("HTTP " + response.status));
  return data;
}

function newEventId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Date.now().toString(16) + "-" + Math.random().toString(16).slice(2);
}

async function rate(div, answer, label) {
  const eventId = newEventId();  // the same id on every retry: the server counts it once
  // The server checks the answer belongs to this conversation.
  const payload = {conversation_id: answer.conversation_id, message_id: answer.message_id,
                   label: label, event_id: eventId};
  for (let attempt = 0; ; attempt++) {
    try {
      await postJson("/api/feedback", payload);
      break;
    } catch (e) {
      if (!(e instanceof TypeError) || attempt >= 2) { setStatus(e.message, true); return; }
    }
  }
  for (const b of div.querySelectorAll("button.rate")) {
    b.setAttribute("aria-pressed", String(b.dataset.label === label));
  }
  setStatus(t("thanks"), false);
}

function addAnswer(data) {
  const div = bubble("assistant answer", data.answer);
  div.dataset.messageId = String(data.message_id);
  const bar = document.createElement("div");
  bar.className = "rating";
  for (const label of ["like", "dislike"]) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "rate " + label;
    b.dataset.label = label;
    b.setAttribute("aria-pressed", "false");
    b.textContent = t(label);
    b.addEventListener("click", () => rate(div, data, label));
    bar.appendChild(b);
  }
  div.appendChild(bar);
}

async function send(event) {
  event.preventDefault();
  const text = $("message").value;
  if (!text.trim()) return;
  $("send").disabled = true;
  bubble("user", text);
  const pending = bubble("assistant pending", t("thinking"));
  try {
    const data = await postJson("/api/chat",
        {conversation_id: conversationId, message: text, lang: lang});
    conversationId = data.conversation_id;
    pending.remove();
    addAnswer(data);
    $("message").value = "";
    setStatus("", false);
  } catch (e) {
    pending.remove();
    setStatus(e.message, true);
  } finally {
    $("send").disabled = false;
    $("message").focus();
  }
}

function newConversation() {
  conversationId = null;
  $("log").replaceChildren();
  setStatus("", false);
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", send);
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
  });
  $("new").addEventListener("click", newConversation);
  $("lang").addEventListener("change", () => {  // a conversation keeps one language
    lang = $("lang").value;
    newConversation();
    applyLanguage();
  });
  applyLanguage();
  $("message").focus();
});
