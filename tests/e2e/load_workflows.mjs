#!/usr/bin/env node
// Load ComfyUI workflow JSON files into a running ComfyUI frontend (headless
// system Chromium via playwright-core), report missing node types, take a
// screenshot per workflow.
//
// Usage:
//   node load_workflows.mjs --server http://127.0.0.1:PORT --out DIR \
//        [--timeout SECONDS] [--settle MS] [--run] wf1.json [wf2.json ...]
//
// --run: also queue each workflow as the Run button does, wait for its end, and
// report the text the pack's web extension shows on the nodes ("reports"),
// with a second screenshot <name>_run.png.
//
// Env: CHROMIUM_PATH (default /usr/bin/chromium)
//
// Output: one JSON line per workflow on stdout (diagnostics go to stderr), with
// the API prompt the frontend would queue for it ("prompt"), combo values not
// among their options ("combo_missing") and the /view image requests it made,
// with their HTTP status ("views").
// Exit status: 0 all workflows loaded with no missing nodes,
//              1 some workflow had missing nodes or failed to load,
//              2 usage error / browser or frontend start-up failure.

import { chromium } from 'playwright-core'
import fs from 'node:fs'
import path from 'node:path'

function usage(msg) {
  if (msg) process.stderr.write(`error: ${msg}\n`)
  process.stderr.write(
    'usage: node load_workflows.mjs --server http://127.0.0.1:PORT --out DIR ' +
      '[--timeout SECONDS] [--settle MS] [--run] workflow1.json [workflow2.json ...]\n'
  )
  process.exit(2)
}

function parseArgs(argv) {
  const opts = { server: null, out: null, timeout: 90, settle: 750, run: false, files: [] }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    const val = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`)
      return argv[++i]
    }
    if (a === '--server') opts.server = val()
    else if (a === '--out') opts.out = val()
    else if (a === '--timeout') opts.timeout = Number(val())
    else if (a === '--settle') opts.settle = Number(val())
    else if (a === '--run') opts.run = true
    else if (a === '-h' || a === '--help') usage()
    else if (a.startsWith('--')) usage(`unknown option ${a}`)
    else opts.files.push(a)
  }
  if (!opts.server) usage('--server is required')
  if (!opts.out) usage('--out is required')
  if (!opts.files.length) usage('no workflow files given')
  if (!(opts.timeout > 0)) usage('--timeout must be a positive number')
  if (!(opts.settle >= 0)) usage('--settle must be >= 0')
  return opts
}

const log = (...a) => process.stderr.write(a.join(' ') + '\n')

// Visible dialogs / toasts / the error overlay (missing nodes etc.).
async function collectUiMessages(page) {
  return await page.evaluate(() => {
    const visible = (el) => {
      const r = el.getBoundingClientRect()
      const s = getComputedStyle(el)
      return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none'
    }
    const seen = new Set()
    const out = []
    const sel = [
      '[data-testid="error-overlay"]',
      '.p-dialog',
      '[role="dialog"]',
      '[role="alertdialog"]',
      '.p-toast-message'
    ]
    for (const s of sel) {
      for (const el of document.querySelectorAll(s)) {
        if (!visible(el)) continue
        // skip elements nested in one already collected
        let skip = false
        for (const p of seen) if (p.contains(el)) skip = true
        if (skip) continue
        seen.add(el)
        const text = (el.innerText || '').replace(/\s+/g, ' ').trim()
        if (text) out.push({ kind: s, text: text.slice(0, 2000) })
      }
    }
    return out
  })
}

async function dismissUi(page) {
  for (let round = 0; round < 3; round++) {
    const n = await page.evaluate(() => {
      let clicked = 0
      const vis = (el) => {
        const r = el.getBoundingClientRect()
        return r.width > 0 && r.height > 0
      }
      const btns = [
        ...document.querySelectorAll(
          '[data-testid="error-overlay-dismiss"], .p-dialog .p-dialog-close-button, ' +
            '.p-dialog [aria-label="Close"], .p-toast-close-button'
        )
      ]
      for (const b of btns) if (vis(b)) { b.click(); clicked++ }
      return clicked
    })
    await page.keyboard.press('Escape').catch(() => {})
    if (!n) break
    await page.waitForTimeout(200)
  }
}

async function nextFrames(page, n = 2) {
  await page.evaluate(
    (n) =>
      new Promise((res) => {
        const step = (k) => (k <= 0 ? res() : requestAnimationFrame(() => step(k - 1)))
        step(n)
      }),
    n
  )
}

async function main() {
  const opts = parseArgs(process.argv.slice(2))
  const server = opts.server.replace(/\/+$/, '')
  fs.mkdirSync(opts.out, { recursive: true })
  const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium'
  const timeoutMs = opts.timeout * 1000

  let browser
  try {
    browser = await chromium.launch({ executablePath, args: ['--no-sandbox'], headless: true })
  } catch (e) {
    log(`failed to launch chromium at ${executablePath}: ${e.message}`)
    process.exit(2)
  }

  let exitCode = 0
  try {
    const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } })
    const page = await context.newPage()
    page.setDefaultTimeout(timeoutMs)

    // Console errors: bucket is flushed into each workflow's JSON line (the
    // first line also gets start-up errors).
    let consoleErrors = []
    page.on('console', (msg) => {
      if (msg.type() === 'error') {
        const loc = msg.location()
        consoleErrors.push(
          msg.text() + (loc && loc.url ? ` (${loc.url}:${loc.lineNumber})` : '')
        )
      }
    })
    page.on('pageerror', (err) => consoleErrors.push(`pageerror: ${err.message}`))
    // Image requests (LoadImage previews of input files), flushed into each workflow's line as "views".
    let views = []
    page.on('response', (resp) => {
      const u = new URL(resp.url())
      if (u.pathname.endsWith('/view'))
        views.push({ ...Object.fromEntries(u.searchParams), status: resp.status() })
    })

    // No internet from the browser: abort external requests immediately
    // (fonts, release notes, telemetry...) instead of waiting for timeouts.
    const serverOrigin = new URL(server).origin
    const isBlockedExternal = (e) =>
      e.startsWith('Failed to load resource: net::ERR_FAILED') && !e.includes(`(${serverOrigin}`)
    await page.route('**/*', (route) => {
      const u = route.request().url()
      if (u.startsWith('data:') || u.startsWith('blob:') || u.startsWith(serverOrigin))
        return route.continue()
      return route.abort()
    })

    // ---- start-up: wait for the frontend app ------------------------------
    const t0 = Date.now()
    try {
      // Retry navigation while the server is still starting (connection
      // refused / non-2xx), until the overall timeout.
      const deadline = Date.now() + timeoutMs
      for (;;) {
        try {
          const resp = await page.goto(server + '/', {
            waitUntil: 'domcontentloaded',
            timeout: Math.max(1000, deadline - Date.now())
          })
          if (resp && !resp.ok()) throw new Error(`HTTP ${resp.status()} for ${server}/`)
          break
        } catch (e) {
          if (Date.now() + 1000 >= deadline) throw e
          await new Promise((r) => setTimeout(r, 1000))
        }
      }
      await page.waitForFunction(
        () => {
          // window.app is set by GraphView once the canvas is set up; the same
          // instance is also at window.comfyAPI.app.app.
          if (!window.app && window.comfyAPI?.app?.app) window.app = window.comfyAPI.app.app
          const app = window.app
          const LG = window.LiteGraph
          return !!(
            app &&
            (app.isGraphReady ?? !!app.graph) &&
            app.graph &&
            app.canvas &&
            app.extensionManager &&
            typeof app.loadGraphData === 'function' &&
            LG &&
            LG.registered_node_types &&
            Object.keys(LG.registered_node_types).length > 0
          )
        },
        null,
        { timeout: timeoutMs, polling: 100 }
      )
      // Loading spinner / block mask gone (absent also counts as hidden).
      await page.waitForSelector('.p-blockui-mask', { state: 'hidden', timeout: timeoutMs })
    } catch (e) {
      log(`frontend did not become ready at ${server}: ${e.message}`)
      const shot = path.join(opts.out, '_startup_failure.png')
      await page.screenshot({ path: shot }).catch(() => {})
      log(`console errors: ${JSON.stringify(consoleErrors)}`)
      log(`screenshot: ${shot}`)
      process.exitCode = 2
      return
    }

    const info = await page.evaluate(() => {
      // Capture the frontend's own missing-node list: ComfyApp.loadGraphData
      // invokes extensions' afterConfigureGraph(missingNodeTypes).
      window.__e2eMissing = null
      try {
        window.app.registerExtension({
          name: 'e2e.loadWorkflows.captureMissing',
          afterConfigureGraph(missing) {
            window.__e2eMissing = (missing || []).map((m) =>
              typeof m === 'string' ? { type: m } : { type: m.type, nodeId: m.nodeId, cnrId: m.cnrId }
            )
          }
        })
      } catch (e) {
        console.warn('e2e: could not register capture extension', e)
      }
      return {
        frontend: window.__COMFYUI_FRONTEND_VERSION__ || null,
        registered: Object.keys(window.LiteGraph.registered_node_types).length
      }
    })
    log(
      `frontend ready in ${((Date.now() - t0) / 1000).toFixed(1)}s ` +
        `(frontend ${info.frontend}, ${info.registered} registered node types)`
    )
    // Close start-up dialogs (e.g. templates browser on first run).
    await page.waitForTimeout(opts.settle)
    const startupUi = await collectUiMessages(page)
    if (startupUi.length) log(`start-up UI messages (dismissed): ${JSON.stringify(startupUi)}`)
    await dismissUi(page)

    // ---- workflows --------------------------------------------------------
    for (const file of opts.files) {
      const name = path.basename(file).replace(/\.json$/i, '')
      const screenshot = path.resolve(opts.out, `${name}.png`)
      const result = {
        workflow: name,
        file: path.resolve(file),
        ok: false,
        nodes: 0,
        missing: [],
        screenshot: null
      }
      try {
        let json
        try {
          json = JSON.parse(fs.readFileSync(file, 'utf8'))
        } catch (e) {
          throw new Error(`cannot read/parse ${file}: ${e.message}`)
        }
        const isEditorFormat = json && typeof json === 'object' && Array.isArray(json.nodes)
        const isApiFormat =
          !isEditorFormat &&
          json &&
          typeof json === 'object' &&
          Object.values(json).length > 0 &&
          Object.values(json).every((v) => v && typeof v === 'object' && 'class_type' in v)
        if (!isEditorFormat && !isApiFormat)
          throw new Error('not a ComfyUI workflow (no "nodes" array and not API/prompt format)')
        result.format = isEditorFormat ? 'editor' : 'api'

        const r = await page.evaluate(
          async ({ json, name, isApiFormat }) => {
            window.__e2eMissing = null
            const LG = window.LiteGraph
            const reg = LG.registered_node_types
            // Types in the file that are not registered (incl. bypassed/muted
            // nodes and nodes inside subgraph definitions).
            const subgraphIds = new Set(
              ((json.definitions && json.definitions.subgraphs) || []).map((s) => s.id)
            )
            const fileTypes = []
            if (isApiFormat) {
              for (const [id, n] of Object.entries(json)) fileTypes.push({ id, type: n.class_type })
            } else {
              for (const n of json.nodes || []) fileTypes.push({ id: n.id, type: n.type, mode: n.mode })
              for (const sg of (json.definitions && json.definitions.subgraphs) || [])
                for (const n of sg.nodes || [])
                  fileTypes.push({ id: `${sg.id}:${n.id}`, type: n.type, mode: n.mode })
            }
            const fileUnregistered = fileTypes.filter(
              (n) => !(String(n.type) in reg) && !subgraphIds.has(n.type)
            )
            let error = null
            try {
              if (isApiFormat) await window.app.loadApiJson(json, name)
              else await window.app.loadGraphData(json, true, true, name)
            } catch (e) {
              error = String((e && e.stack) || e)
            }
            return { error, fileNodeCount: isApiFormat ? fileTypes.length : (json.nodes || []).length, fileUnregistered }
          },
          { json, name, isApiFormat }
        )

        // Let the UI settle: overlay / dialogs / deferred rendering; wait (5 s at most) for the LoadImage previews.
        const loadImages = isEditorFormat ? json.nodes.filter((n) => n.type === 'LoadImage').length : 0
        for (let waited = 0; views.length < loadImages && waited < 5000; waited += 100) await page.waitForTimeout(100)
        await nextFrames(page, 3)
        await page.waitForTimeout(opts.settle)
        await nextFrames(page, 2)

        const g = await page.evaluate(() => {
          const app = window.app
          const LG = window.LiteGraph
          const reg = LG.registered_node_types
          const root = app.rootGraph || app.graph
          const graphMissing = []
          // Combo values not among the widget's options: the frontend marks these (a LoadImage photo absent from
          // the input folder's list) as missing inputs.
          const comboMissing = []
          let total = 0
          const walk = (graph, prefix) => {
            for (const n of graph._nodes || graph.nodes || []) {
              total++
              const isSub = typeof n.isSubgraphNode === 'function' && n.isSubgraphNode()
              const unregistered = !isSub && !(String(n.type) in reg)
              if (unregistered || n.has_errors)
                graphMissing.push({
                  id: prefix + n.id,
                  type: String(n.type),
                  title: n.title,
                  mode: n.mode,
                  has_errors: !!n.has_errors,
                  registered: !unregistered
                })
              for (const w of n.widgets || []) {
                const values = w.type === 'combo' ? w.options?.values : null
                if (Array.isArray(values) && !values.includes(w.value))
                  comboMissing.push({ id: prefix + n.id, title: n.title, widget: w.name, value: w.value })
              }
              if (isSub && n.subgraph) walk(n.subgraph, prefix + n.id + ':')
            }
          }
          walk(root, '')
          return {
            topLevel: (root._nodes || root.nodes || []).length,
            total,
            links: root.links ? (root.links.size ?? Object.keys(root.links).length) : null,
            graphMissing,
            comboMissing,
            frontendMissing: window.__e2eMissing
          }
        })

        result.nodes = g.topLevel
        result.nodes_total = g.total
        result.file_nodes = r.fileNodeCount
        const missing = new Set()
        for (const m of g.graphMissing) if (!m.registered) missing.add(m.type)
        for (const m of g.frontendMissing || []) missing.add(m.type)
        for (const m of r.fileUnregistered) missing.add(String(m.type))
        result.missing = [...missing].sort()
        result.missing_details = {
          graph: g.graphMissing, // nodes in the loaded graph: unregistered type or has_errors
          frontend: g.frontendMissing, // ComfyUI's own list (afterConfigureGraph); null = hook not called
          file: r.fileUnregistered // types in the JSON not in LiteGraph.registered_node_types
        }
        result.combo_missing = g.comboMissing
        result.ui_messages = await collectUiMessages(page)
        // The API prompt the frontend would queue for this graph (what "Queue" sends).
        result.prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output).catch(() => null)
        if (r.error) result.error = `load threw: ${r.error}`
        else if (g.topLevel !== r.fileNodeCount)
          result.error = `graph has ${g.topLevel} top-level nodes, file has ${r.fileNodeCount} (load failed or graph replaced?)`
        else if (result.format === 'editor' && g.frontendMissing === null)
          result.error = 'loadGraphData returned before configuring the graph (error dialog?)'

        // Dismiss dialogs/overlay, re-render, screenshot.
        await dismissUi(page)
        await nextFrames(page, 2)
        await page.screenshot({ path: screenshot })
        result.screenshot = screenshot
        result.ok = !result.error && result.missing.length === 0
        if (opts.run && result.ok) {
          result.run = await page.evaluate(async (timeoutMs) => {
            const api = window.comfyAPI.api.api
            const done = new Promise((resolve) => {
              const finish = (outcome) => (event) => resolve({ outcome, detail: event.detail })
              api.addEventListener('execution_success', finish('success'), { once: true })
              api.addEventListener('execution_error', finish('error'), { once: true })
              setTimeout(() => resolve({ outcome: 'timeout' }), timeoutMs)
            })
            await window.app.queuePrompt(0, 1)
            const { outcome, detail } = await done
            return { outcome, error: outcome === 'error' ? String(detail?.exception_message) : null }
          }, timeoutMs)
          await nextFrames(page, 3)
          await page.waitForTimeout(opts.settle)
          result.reports = await page.evaluate(() =>
            [...document.querySelectorAll('.refface-report')].map((e) => ({
              text: e.innerText,
              warnings: e.querySelectorAll('.refface-warning').length
            }))
          )
          result.run_screenshot = path.resolve(opts.out, `${name}_run.png`)
          await page.screenshot({ path: result.run_screenshot })
          if (result.run.outcome !== 'success') result.error = `run: ${result.run.outcome} ${result.run.error ?? ''}`
          result.ok = !result.error
        }
      } catch (e) {
        result.error = String(e && e.message ? e.message : e)
        if (result.format) try {
          await page.screenshot({ path: screenshot })
          result.screenshot = screenshot
        } catch {}
      }
      // Requests to other origins are aborted by us (no internet); keep
      // those separate so console_errors holds only same-origin problems.
      result.console_errors = consoleErrors.filter((e) => !isBlockedExternal(e))
      result.console_errors_external = consoleErrors.filter(isBlockedExternal)
      consoleErrors = []
      result.views = views
      views = []
      if (!result.ok) exitCode = 1
      process.stdout.write(JSON.stringify(result) + '\n')
    }
  } finally {
    await browser.close().catch(() => {})
  }
  if (process.exitCode === undefined || process.exitCode === 0) process.exitCode = exitCode
}

main().catch((e) => {
  log(`fatal: ${e && e.stack ? e.stack : e}`)
  process.exit(2)
})
