//! The pages a buyer's browser sees at the simulated gateways: the Alipay cashier (desktop for
//! page.pay, phone-sized for wap.pay), the page behind a WeChat Native `code_url`, and the
//! results. Plain HTML and a form post; everything a merchant supplied is escaped.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use crate::format::{html_escape, yuan};
use crate::store::Order;

#[derive(Clone, Copy)]
enum Theme {
    Alipay,
    Wechat,
}

/// `phone`: full width with no card, as a phone browser shows the wap cashier.
fn layout(theme: Theme, title: &str, body: &str, phone: bool) -> String {
    let (accent, brand) = match theme {
        Theme::Alipay => ("#1677ff", "支付宝 Alipay"),
        Theme::Wechat => ("#07c160", "微信支付 WeChat Pay"),
    };
    format!(
        r#"<!doctype html>
<html lang="zh-CN">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · {brand} (simulator)</title>
<style>
  * {{ box-sizing: border-box; }}
  body {{ margin: 0; font: 16px/1.5 system-ui, -apple-system, "PingFang SC", "Microsoft YaHei", sans-serif;
         background: #f3f5f8; color: #1f2329; }}
  header {{ background: {accent}; color: #fff; padding: 12px 20px; font-weight: 600; }}
  header small {{ font-weight: 400; opacity: .85; margin-left: .5em; }}
  main {{ max-width: 460px; margin: 32px auto; background: #fff; border-radius: 12px; padding: 24px;
         box-shadow: 0 2px 12px rgba(0,0,0,.08); }}
  @media (max-width: 500px) {{ main {{ margin: 0 auto; border-radius: 0; }} }}
  body.phone main {{ margin: 0 auto; border-radius: 0; box-shadow: none; min-height: calc(100vh - 48px); }}
  h1 {{ font-size: 18px; margin: 0 0 8px; word-break: break-word; }}
  .amount {{ font-size: 36px; font-weight: 700; margin: 8px 0 16px; }}
  dl {{ display: grid; grid-template-columns: auto 1fr; gap: 4px 12px; margin: 0 0 20px; font-size: 14px; }}
  dt {{ color: #646a73; }}
  dd {{ margin: 0; word-break: break-all; }}
  button, .button {{ display: block; width: 100%; padding: 14px; border: 0; border-radius: 8px;
         background: {accent}; color: #fff; font-size: 17px; font-weight: 600; cursor: pointer;
         text-align: center; text-decoration: none; }}
  .note {{ color: #8f959e; font-size: 13px; margin-top: 16px; }}
  .error {{ color: #d83931; }}
  code {{ font-size: 13px; word-break: break-all; }}
</style>
</head>
<body class="{body_class}">
<header>{brand}<small>simulator · 测试环境</small></header>
<main>
{body}
</main>
</body>
</html>
"#,
        body_class = if phone { "phone" } else { "" },
    )
}

fn order_details(order: &Order, trade_label: &str) -> String {
    let mut rows = format!(
        "<dt>订单号 Order</dt><dd><code>{}</code></dd>",
        html_escape(&order.out_trade_no)
    );
    if let Some(trade_no) = &order.trade_no {
        rows.push_str(&format!(
            "<dt>{trade_label}</dt><dd><code>{}</code></dd>",
            html_escape(trade_no)
        ));
    }
    format!("<dl>{rows}</dl>")
}

/// `alipay.trade.page.pay` (desktop) and `alipay.trade.wap.pay` (phone) cashier.
pub fn alipay_cashier(order: &Order, wap: bool) -> Response {
    let body = format!(
        r#"<h1>{subject}</h1>
<div class="amount">¥{amount}</div>
{details}
<form method="post" action="/sim/alipay/pay">
  <input type="hidden" name="out_trade_no" value="{no}">
  <button type="submit" id="pay">确认付款 Pay ¥{amount}</button>
</form>
<p class="note">A test gateway: no money moves. Paying sends the signed notification to the merchant.</p>"#,
        subject = html_escape(&order.subject),
        amount = yuan(order.amount),
        details = order_details(order, "交易号 Trade no"),
        no = html_escape(&order.out_trade_no),
    );
    Html(layout(Theme::Alipay, "收银台 Cashier", &body, wap)).into_response()
}

/// The page the real gateway shows when it refuses a page.pay / wap.pay request.
pub fn alipay_error(code: &str, sub_code: &str, sub_msg: &str) -> Response {
    let body = format!(
        r#"<h1 class="error">支付请求错误 The payment request was refused</h1>
<dl><dt>错误代码 code</dt><dd><code id="code">{code}</code></dd>
<dt>sub_code</dt><dd><code id="sub_code">{sub_code}</code></dd>
<dt>错误原因 reason</dt><dd>{reason}</dd></dl>"#,
        code = html_escape(code),
        sub_code = html_escape(sub_code),
        reason = html_escape(sub_msg),
    );
    (
        StatusCode::BAD_REQUEST,
        Html(layout(Theme::Alipay, "错误 Error", &body, false)),
    )
        .into_response()
}

/// What a WeChat Native `code_url` stands for: the page a buyer's phone opens after scanning.
pub fn wechat_qr(order: &Order, pr: &str, code_url: &str) -> Response {
    let body = format!(
        r#"<h1>{subject}</h1>
<div class="amount">¥{amount}</div>
{details}
<form method="post" action="/sim/wechat/qr/{pr}/pay">
  <button type="submit" id="pay">立即支付 Pay ¥{amount}</button>
</form>
<p class="note">A test gateway: no money moves. This page stands for <code>{code_url}</code>.</p>"#,
        subject = html_escape(&order.subject),
        amount = yuan(order.amount),
        details = order_details(order, "交易单号 Transaction"),
        pr = html_escape(pr),
        code_url = html_escape(code_url),
    );
    Html(layout(Theme::Wechat, "扫码支付 Native", &body, false)).into_response()
}

/// After the Pay button: the order is paid and the notification is on its way.
pub fn paid(order: &Order, wechat: bool) -> Response {
    let body = format!(
        r#"<h1 id="result">支付成功 Paid</h1>
<div class="amount">¥{amount}</div>
{details}
<p class="note">The notification is being sent to the merchant; <a href="/sim/orders/{no}">what the gateway knows</a>.</p>"#,
        amount = yuan(order.amount),
        details = order_details(
            order,
            if wechat {
                "交易单号 Transaction"
            } else {
                "交易号 Trade no"
            }
        ),
        no = html_escape(&order.out_trade_no),
    );
    let theme = if wechat { Theme::Wechat } else { Theme::Alipay };
    Html(layout(theme, "支付成功 Paid", &body, false)).into_response()
}

/// A refusal on a page (already paid, closed, unknown).
pub fn message(status: StatusCode, wechat: bool, title: &str, text: &str) -> Response {
    let body = format!(
        r#"<h1 class="error" id="result">{title}</h1><p>{text}</p>"#,
        title = html_escape(title),
        text = html_escape(text),
    );
    let theme = if wechat { Theme::Wechat } else { Theme::Alipay };
    (status, Html(layout(theme, title, &body, false))).into_response()
}
