// Opens the dashboard in headless Chromium, waits until its charts are drawn,
// prints what it shows as JSON and saves a screenshot. With a token, the
// service wants one: the page must ask for it, refuse a wrong one, take the
// right one, and still have it after a reload (the browser session).
// Usage: node dashboard.mjs <page url> <screenshot.png> [token]
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [url, screenshot, token] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error("usage: node dashboard.mjs <page url> <screenshot.png>");
  process.exit(2);
}
const profile = mkdtempSync(join(tmpdir(), "shopstream-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1280, height: 900 },
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = context.pages()[0] ?? (await context.newPage());
  const origin = new URL(url).origin;
  const outside = [];
  const errors = [];
  // Anything not from the service itself would need the internet: refuse and report it.
  await page.route("**/*", (route) => {
    const target = route.request().url();
    if (target.startsWith(origin) || target.startsWith("data:")) return route.continue();
    outside.push(target);
    return route.abort();
  });
  page.on("pageerror", (error) => errors.push(String(error)));
  // With a token, the refusals the test provokes are expected: Chromium
  // logs each 401 it receives.
  const expected = (text) => token && text.includes("status of 401");
  page.on("console", (message) => {
    if (message.type() === "error" && !expected(message.text())) errors.push(message.text());
  });
  const loaded = await page.goto(url);
  const auth = { page_status: loaded.status() };
  if (token) {
    const signIn = async (value) => {
      await page.waitForSelector('[data-testid="sign-in"]:not([hidden])', { timeout: 30000 });
      await page.fill('[data-testid="token"]', value);
      await page.click('[data-testid="sign-in"] button');
    };
    await page.waitForSelector('[data-testid="sign-in"]:not([hidden])', { timeout: 30000 });
    auth.asked = await page.textContent("#status");
    await signIn("not-the-token");
    await page.waitForFunction(() => document.querySelector("#status").textContent.includes("refused"), null, { timeout: 30000 });
    auth.refused = await page.textContent("#status");
    await signIn(token);
    await page.waitForSelector('body[data-rendered="1"]', { timeout: 30000 });
    const reloaded = await page.reload();
    auth.reload_status = reloaded.status();
    await page.waitForSelector('body[data-rendered="1"]', { timeout: 30000 });
    auth.asked_again = !(await page.isHidden('[data-testid="sign-in"]'));
    auth.stored = await page.evaluate(() => sessionStorage.getItem("shopstream-token") !== null);
  }
  await page.waitForSelector('body[data-rendered="1"]', { timeout: 30000 });
  await page.waitForSelector("#revenue-chart path[data-points]", { timeout: 30000 });
  const shown = await page.evaluate(() => {
    const text = (selector) => document.querySelector(selector)?.textContent ?? null;
    const rows = (id) => [...document.querySelectorAll(`#${id} tr`)].map((tr) => [...tr.cells].map((td) => td.textContent));
    const stages = ["created", "paid", "shipped", "delivered", "cancelled", "refunded"];
    return {
      from: Number(document.body.dataset.from),
      to: Number(document.body.dataset.to),
      status: text("#status"),
      funnel: Object.fromEntries(stages.map((s) => [s, text(`[data-testid="funnel-${s}"]`)])),
      active_users: text("#active-users"),
      active_users_window: Number(document.querySelector("#active-users").dataset.windowStart),
      rooms: rows("rooms"),
      queries: rows("queries"),
      zero_queries: rows("zero-queries"),
      searches: text("#searches"),
      zero_results: text("#zero-results"),
      revenue_totals: Object.fromEntries([...document.querySelectorAll('[data-testid^="revenue-total-"]')]
        .map((node) => [node.dataset.testid.slice("revenue-total-".length), node.textContent])),
      revenue_lines: Object.fromEntries([...document.querySelectorAll("#revenue-chart path[data-series]")]
        .map((path) => [path.dataset.series, Number(path.dataset.points)])),
    };
  });
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ ...shown, auth, outside, errors }));
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
